// Progressive enhancement only: every page works with plain forms.
(function () {
  "use strict";

  function csrfToken(form) {
    const input = form.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  // Drag-and-drop onto the upload zone, then submit.
  function setupDropzone() {
    const zone = document.getElementById("dropzone");
    const input = document.getElementById("id_image");
    const form = document.getElementById("classify-form");
    if (!zone || !input || !form) return;
    const chosen = document.getElementById("chosen-file");
    const show = () => { chosen.textContent = input.files.length ? input.files[0].name : ""; };
    input.addEventListener("change", show);
    ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
      event.preventDefault(); zone.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      if (!event.dataTransfer.files.length) return;
      input.files = event.dataTransfer.files;
      show();
      form.requestSubmit();
    });
    form.addEventListener("submit", () => {
      const button = document.getElementById("classify-button");
      if (button) { button.disabled = true; button.textContent = "Classifying…"; }
    });
  }

  // The review threshold: re-flag in the page at once, remember it for the user.
  function setupThreshold() {
    const form = document.getElementById("threshold-form");
    const slider = document.getElementById("threshold");
    if (!form || !slider) return;
    const output = document.getElementById("threshold-value");
    const apply = () => {
      const threshold = parseFloat(slider.value);
      output.textContent = threshold.toFixed(2);
      document.querySelectorAll("[data-confidence]").forEach((el) => {
        const review = parseFloat(el.dataset.confidence) < threshold || el.dataset.outlier === "1";
        el.classList.toggle("needs-review", review);
        const warning = el.querySelector(".review-warning");
        if (warning) warning.hidden = !review;
      });
      document.dispatchEvent(new CustomEvent("wbc:threshold", { detail: threshold }));
    };
    let timer = null;
    const save = () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        fetch(form.action, {
          method: "POST",
          headers: { "Accept": "application/json", "X-CSRFToken": csrfToken(form) },
          body: new URLSearchParams({ threshold: slider.value }),
          credentials: "same-origin",
        });
      }, 250);
    };
    slider.addEventListener("input", apply);
    slider.addEventListener("change", save);
    form.addEventListener("submit", (event) => { event.preventDefault(); save(); });
    apply();
  }

  document.addEventListener("DOMContentLoaded", () => { setupDropzone(); setupThreshold(); });
})();
