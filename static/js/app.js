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
    const preview = document.getElementById("chosen-preview");
    const show = () => {
      chosen.textContent = input.files.length ? input.files[0].name : "";
      if (!preview) return;
      if (preview.src) URL.revokeObjectURL(preview.src);
      const file = input.files[0];
      preview.hidden = !file;
      if (file) preview.src = URL.createObjectURL(file); else preview.removeAttribute("src");
    };
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
    // One form for a file or a URL: whichever the user gave decides where it goes, whatever button sent it.
    const url = form.querySelector("input[name=url]");
    const urlButton = document.getElementById("url-button");
    const fileButton = document.getElementById("classify-button");
    form.addEventListener("submit", (event) => {
      const hasFile = input.files.length > 0;
      const hasUrl = Boolean(url && url.value.trim());
      const used = event.submitter || fileButton;
      const target = !urlButton || hasFile === hasUrl ? used : (hasUrl ? urlButton : fileButton);
      if (target !== used) { event.preventDefault(); form.requestSubmit(target); return; }
      if (used) { used.disabled = true; used.textContent = used === urlButton ? "Fetching…" : "Classifying…"; }
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

  // Batch upload: dropped files (several, or a .zip) join the picker's selection.
  function setupBatchDropzone() {
    const zone = document.getElementById("batch-dropzone");
    const input = document.getElementById("id_files");
    const form = document.getElementById("batch-form");
    if (!zone || !input || !form) return;
    const chosen = document.getElementById("batch-chosen");
    const show = () => {
      const n = input.files.length;
      chosen.textContent = n ? `${n} file${n === 1 ? "" : "s"} chosen` : "";
    };
    input.addEventListener("change", show);
    ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
      event.preventDefault(); zone.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      const transfer = new DataTransfer();
      Array.from(input.files).forEach((f) => transfer.items.add(f));
      Array.from(event.dataTransfer.files).forEach((f) => transfer.items.add(f));
      input.files = transfer.files;
      show();
    });
    form.addEventListener("submit", () => {
      const button = document.getElementById("batch-button");
      if (button) { button.disabled = true; button.textContent = "Uploading…"; }
    });
  }

  // Live progress of a running batch; the finished report replaces the page by itself.
  function setupProgress() {
    const batch = document.getElementById("batch");
    if (!batch || batch.dataset.finished === "1") return;
    const bar = document.getElementById("progress-bar");
    const text = document.getElementById("progress-text");
    let seen = -1;
    const poll = () => {
      // Long poll: the server answers as soon as another chunk is done (or after 5 s).
      const url = `${batch.dataset.statusUrl}?wait=5&after=${seen}`;
      fetch(url, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
        .then((response) => response.json())
        .then((s) => {
          const finished = s.done + s.failed;
          seen = finished;
          bar.style.width = (s.total ? (100 * finished / s.total) : 0).toFixed(1) + "%";
          let message = `${s.done} of ${s.total} images classified`;
          if (s.failed) message += `, ${s.failed} failed`;
          if (s.eta_seconds !== null && s.status === "running") message += ` · about ${Math.ceil(s.eta_seconds)} s left`;
          if (s.status === "queued" && !s.worker_warning) message += " · waiting for the worker";
          text.textContent = message;
          const warning = document.getElementById("worker-warning");
          if (warning) { warning.textContent = s.worker_warning || ""; warning.hidden = !s.worker_warning; }
          if (s.status === "done" || s.status === "failed") { window.location.reload(); return; }
          setTimeout(poll, 200);
        })
        .catch(() => setTimeout(poll, 3000));
    };
    poll();
  }

  // The "needs review" tally follows the slider.
  function setupTally() {
    const counter = document.getElementById("review-count");
    if (!counter) return;
    document.addEventListener("wbc:threshold", (event) => {
      counter.textContent = document.querySelectorAll("#report-table tr.needs-review").length;
      document.querySelectorAll(".threshold-echo").forEach((el) => { el.textContent = event.detail.toFixed(2); });
      const csv = document.getElementById("csv-link");
      if (csv) csv.href = csv.href.split("?")[0] + "?threshold=" + event.detail.toFixed(2);
    });
  }

  // Model and normalisation dropdowns: show the card's z-score defaults, warn on a mismatch.
  function setupModelFields() {
    document.querySelectorAll("[data-model-fields]").forEach((fieldset) => {
      const model = fieldset.querySelector("select[name=model]");
      const method = fieldset.querySelector("select[name=normalization]");
      const mean = fieldset.querySelector("input[name=norm_mean]");
      const std = fieldset.querySelector("input[name=norm_std]");
      const zscore = fieldset.querySelector("[data-zscore-fields]");
      const warning = fieldset.querySelector("[data-norm-warning]");
      if (!model || !method) return;
      const own = () => {
        const option = model.options[model.selectedIndex];
        try { return JSON.parse(option.dataset.normalization || "{}"); } catch (e) { return {}; }
      };
      const update = (modelChanged) => {
        const card = own();
        const chosen = method.value || card.method;
        zscore.hidden = method.value !== "zscore";
        if (chosen === "zscore" && (modelChanged || !mean.value)) {
          const m = card.method === "zscore" ? card.mean : [127.5, 127.5, 127.5];
          const s = card.method === "zscore" ? card.std : [127.5, 127.5, 127.5];
          mean.value = m.join(", "); std.value = s.join(", ");
        }
        warning.hidden = !method.value || method.value === card.method;
      };
      model.addEventListener("change", () => update(true));
      method.addEventListener("change", () => update(false));
      update(false);
    });
  }

  // Figures open large in a dialog (Escape, a click or the button closes it); without script the link opens the PNG.
  function setupZoom() {
    const links = document.querySelectorAll("a[data-zoom]");
    if (!links.length) return;
    const dialog = document.createElement("dialog");
    dialog.className = "lightbox";
    dialog.id = "lightbox";
    const image = document.createElement("img");
    const close = document.createElement("button");
    close.type = "button"; close.className = "lightbox-close"; close.textContent = "Close";
    dialog.append(close, image);
    document.body.append(dialog);
    dialog.addEventListener("click", () => dialog.close());
    links.forEach((link) => link.addEventListener("click", (event) => {
      event.preventDefault();
      const small = link.querySelector("img");
      image.src = link.href;
      image.alt = small ? small.alt : "";
      dialog.showModal();
    }));
  }

  // Copy a shown secret (the new API token) to the clipboard.
  function setupCopy() {
    document.querySelectorAll("[data-copy-target]").forEach((button) => button.addEventListener("click", () => {
      const source = document.getElementById(button.dataset.copyTarget);
      const text = source ? source.textContent.trim() : "";
      const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 2000); };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, () => { button.textContent = "Select and copy by hand"; });
        return;
      }
      const range = document.createRange(); // no clipboard API (plain http): select the key for Ctrl+C
      range.selectNodeContents(source);
      const selection = window.getSelection();
      selection.removeAllRanges(); selection.addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }));
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupZoom();
    setupCopy();
    setupModelFields();
    setupTally();
    setupDropzone();
    setupBatchDropzone();
    setupThreshold();
    setupProgress();
  });
})();
