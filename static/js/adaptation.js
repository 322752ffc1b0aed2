// Live progress of an adaptation job: stage, share done and time left; the page reloads when the job ends.
(function () {
  "use strict";
  const job = document.getElementById("job");
  if (!job || job.dataset.active !== "1") return;
  const bar = document.getElementById("job-progress");
  const stage = document.getElementById("job-stage");
  const time = document.getElementById("job-time");
  const poll = () => {
    fetch(job.dataset.statusUrl, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then((response) => response.json())
      .then((s) => {
        if (s.finished) { window.location.reload(); return; }
        bar.value = s.progress;
        stage.textContent = (s.stage || "waiting for the worker") + (s.cancel_requested ? " · stopping at the next step" : "");
        let text = s.elapsed_seconds !== null ? `${Math.round(s.elapsed_seconds)} s elapsed` : "";
        if (s.remaining_seconds !== null) text += ` · about ${Math.ceil(s.remaining_seconds)} s left`;
        time.textContent = text;
        setTimeout(poll, 2000);
      })
      .catch(() => setTimeout(poll, 5000));
  };
  poll();
})();
