// The web page's logic, plain JS without a build step: fetch the task list, submit the form to the JSON API,
// poll the job, render every task's answer and draw the grounding boxes over the first image.
"use strict";

(function () {
  const API = {
    tasks: "api/v1/tasks",
    jobs: "api/v1/jobs",
  };
  // Polling backs off from fast (a tiny job finishes in well under a second) to gentle (a queued job may wait).
  const POLL_FIRST_MS = 250;
  const POLL_MAX_MS = 2000;
  // Consecutive failed polls (network down, 503 while Redis restarts) tolerated before giving up.
  const POLL_MAX_FAILURES = 8;
  const BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#008080", "#9a6324"];
  const STAGES = {
    queued: "waiting for a worker",
    decode: "decoding the images",
    detector: "finding regions (detector)",
    vilbert: "answering (ViLBERT)",
    done: "finishing",
  };

  const $ = (id) => document.getElementById(id);
  const form = $("job-form");
  const statusBox = $("status");
  const errorBox = $("error");
  const submitButton = $("submit");
  let tasksByName = new Map();
  let defaults = {};
  let tasksTouched = false; // once the user picks tasks, image-count changes no longer reset them
  let imageUrls = [];
  let resultUrls = [];
  let currentJob = 0; // a new submission makes older polling loops stop

  // ------------------------------------------------------------------------------------------- small helpers

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else if (key === "style") Object.assign(node.style, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children || []) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function percent(p) {
    const value = Math.max(0, Math.min(1, Number(p) || 0)) * 100;
    return value >= 10 || value === 0 ? value.toFixed(1) + " %" : value.toFixed(2) + " %";
  }

  function setStatus(text, busy) {
    statusBox.textContent = text;
    statusBox.classList.toggle("busy", Boolean(busy));
    form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function showError(code, message) {
    errorBox.replaceChildren(
      el("strong", { text: "Error" + (code ? " (" + code + ")" : "") + ": " }),
      el("span", { className: "error-message", text: message || "something went wrong" })
    );
    errorBox.hidden = false;
    errorBox.focus();
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.replaceChildren();
  }

  // The API answers errors as {"error": {"code", "message"}}; a proxy in front may answer HTML or nothing.
  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (ignored) {
      body = null;
    }
    if (body && body.error) {
      return { code: body.error.code || String(response.status), message: body.error.message || response.statusText };
    }
    return { code: String(response.status), message: "the server answered " + response.status + " " + response.statusText };
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  // ------------------------------------------------------------------------------------------------- tasks

  async function loadTasks() {
    const hint = $("tasks-hint");
    let body;
    try {
      const response = await fetch(API.tasks, { headers: { Accept: "application/json" } });
      if (!response.ok) {
        const error = await readError(response);
        throw new Error(error.message);
      }
      body = await response.json();
    } catch (err) {
      hint.textContent = "The task list could not be loaded (" + err.message + "); the server's default tasks will be used.";
      hint.classList.add("error-text");
      return;
    }
    defaults = body.default || {};
    tasksByName = new Map(body.tasks.map((task) => [task.name, task]));
    const container = $("tasks");
    container.replaceChildren();
    for (const task of body.tasks) {
      const id = "task-" + task.name;
      const images = task.images === "1+" ? "one or more images" : task.images === 1 ? "one image" : task.images + " images";
      const extra = task.needs_candidate_boxes ? "; needs candidate boxes (More options)" : "";
      container.append(el("div", { className: "task" }, [
        el("input", { type: "checkbox", id: id, name: "task", value: task.name, "aria-describedby": id + "-desc" }),
        el("label", { for: id }, [el("span", { className: "task-title", text: task.title }), " ",
          el("code", { text: task.name })]),
        el("p", { className: "hint", id: id + "-desc", text: task.description + " (" + images + extra + ")" }),
      ]));
    }
    container.addEventListener("change", (event) => {
      tasksTouched = true;
      // A pointing task needs candidate boxes: show where to give them.
      const task = tasksByName.get(event.target.value);
      if (event.target.checked && task && task.needs_candidate_boxes) $("advanced").open = true;
    });
    hint.textContent = "Choose one or more. The defaults fit the number of images you picked.";
    applyDefaultTasks();
  }

  function imageCount() {
    return $("image").files.length + $("more-images").files.length;
  }

  function applyDefaultTasks() {
    if (tasksTouched || !tasksByName.size) return;
    const count = Math.max(1, Math.min(3, imageCount()));
    const chosen = new Set(defaults[String(count)] || []);
    for (const box of document.querySelectorAll('#tasks input[name="task"]')) box.checked = chosen.has(box.value);
  }

  function selectedTasks() {
    return Array.from(document.querySelectorAll('#tasks input[name="task"]:checked'), (box) => box.value);
  }

  // ------------------------------------------------------------------------------------------------ images

  function chosenFiles() {
    return [...$("image").files, ...$("more-images").files];
  }

  function refreshThumbnails() {
    for (const url of imageUrls) URL.revokeObjectURL(url);
    const files = chosenFiles();
    imageUrls = files.map((file) => URL.createObjectURL(file));
    const list = $("thumbnails");
    list.replaceChildren(...files.map((file, index) => el("li", {}, [
      el("img", { src: imageUrls[index], alt: "" }),
      el("span", { text: "image " + index + ": " + file.name }),
    ])));
    const editor = $("box-editor");
    editor.hidden = !$("image").files.length;
    if ($("image").files.length) $("box-image").src = imageUrls[0];
    applyDefaultTasks();
  }

  // ------------------------------------------------------------------------------- candidate boxes (pointing)

  // The boxes field is the truth (typed or drawn); the editor draws what it holds and appends what is dragged.
  function parseBoxes() {
    try {
      const boxes = JSON.parse($("boxes").value || "[]");
      return Array.isArray(boxes) ? boxes.filter((b) => Array.isArray(b) && b.length === 4) : [];
    } catch (ignored) {
      return [];
    }
  }

  function drawCandidateBoxes(extra) {
    const image = $("box-image");
    const overlay = $("box-overlay");
    overlay.replaceChildren();
    if (!image.naturalWidth) return;
    const size = { width: image.naturalWidth, height: image.naturalHeight };
    const boxes = parseBoxes().concat(extra ? [extra] : []);
    boxes.forEach((box, index) => drawBox(overlay, box, size, BOX_COLOURS[index % BOX_COLOURS.length], "candidate " + index));
  }

  function imagePoint(event) {
    const image = $("box-image");
    const frame = image.getBoundingClientRect();
    const clamp = (v, high) => Math.max(0, Math.min(high, v));
    return [
      Math.round(clamp((event.clientX - frame.left) * image.naturalWidth / frame.width, image.naturalWidth)),
      Math.round(clamp((event.clientY - frame.top) * image.naturalHeight / frame.height, image.naturalHeight)),
    ];
  }

  function setUpBoxEditor() {
    const stage = $("box-stage");
    let start = null;
    const boxFrom = (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
    stage.addEventListener("pointerdown", (event) => {
      if (!$("box-image").naturalWidth) return;
      start = imagePoint(event);
      stage.setPointerCapture(event.pointerId);
      event.preventDefault();
    });
    stage.addEventListener("pointermove", (event) => {
      if (start) drawCandidateBoxes(boxFrom(start, imagePoint(event)));
    });
    stage.addEventListener("pointerup", (event) => {
      if (!start) return;
      const box = boxFrom(start, imagePoint(event));
      start = null;
      // A click without a drag is not a box (the server needs x2 > x1 and y2 > y1).
      if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) $("boxes").value = JSON.stringify(parseBoxes().concat([box]));
      drawCandidateBoxes();
    });
    $("boxes").addEventListener("input", () => drawCandidateBoxes());
    $("box-image").addEventListener("load", () => drawCandidateBoxes());
    $("clear-boxes").addEventListener("click", () => {
      $("boxes").value = "";
      drawCandidateBoxes();
    });
  }

  // ---------------------------------------------------------------------------------------------- the job

  async function submitJob(event) {
    event.preventDefault();
    clearError();
    $("results").hidden = true; // the previous answers do not belong to the new request
    const jobNumber = ++currentJob;
    const data = new FormData();
    for (const file of chosenFiles()) data.append("image", file, file.name);
    data.append("text", $("text").value);
    const tasks = selectedTasks();
    if (tasks.length) data.append("tasks", tasks.join(","));
    if ($("top-k").value.trim()) data.append("top_k", $("top-k").value.trim());
    if ($("boxes").value.trim()) data.append("boxes", $("boxes").value.trim());
    const files = chosenFiles();

    submitButton.disabled = true;
    setStatus("Uploading…", true);
    try {
      const response = await fetch(API.jobs, { method: "POST", body: data, headers: { Accept: "application/json" } });
      if (response.status !== 202) {
        const error = await readError(response);
        const retry = response.headers.get("Retry-After");
        setStatus("");
        showError(error.code, error.message + (retry ? " (retry in " + retry + " s)" : ""));
        return;
      }
      const job = await response.json();
      const url = response.headers.get("Location") || job.url || API.jobs + "/" + job.id;
      await poll(url, jobNumber, files);
    } catch (err) {
      setStatus("");
      showError("network_error", "could not reach the service: " + err.message);
    } finally {
      if (jobNumber === currentJob) submitButton.disabled = false;
    }
  }

  function describeProgress(job) {
    if (job.status === "queued") {
      const position = job.queue_position;
      if (position === null || position === undefined) return "Queued…";
      return position === 0 ? "Queued: next in line…" : "Queued: " + position + " job" + (position === 1 ? "" : "s") + " ahead…";
    }
    const stage = STAGES[job.stage] || job.stage || "running";
    return "Running: " + stage + (job.stage_detail ? " (" + job.stage_detail + ")" : "") + "…";
  }

  async function poll(url, jobNumber, files) {
    let delay = POLL_FIRST_MS;
    let failures = 0;
    let lastStatus = "queued";
    const started = performance.now();
    const stop = (code, message) => {
      setStatus("");
      showError(code, message);
    };
    setStatus("Queued…", true);
    while (jobNumber === currentJob) {
      let job = null;
      try {
        const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
        if (response.ok) {
          job = await response.json();
          failures = 0;
        } else if (response.status === 404 || ++failures >= POLL_MAX_FAILURES) {
          const error = await readError(response); // 404: unknown or expired; others: gave up after retries
          return stop(error.code, error.message);
        }
      } catch (err) {
        if (++failures >= POLL_MAX_FAILURES) return stop("network_error", "lost contact with the service: " + err.message);
      }
      if (job && jobNumber === currentJob) {
        if (job.status === "finished") {
          const seconds = ((performance.now() - started) / 1000).toFixed(1);
          setStatus("Finished in " + seconds + " s.", false);
          renderResult(job, files);
          return;
        }
        if (job.status === "failed") {
          const error = job.error || {};
          const where = error.stage ? " [stage: " + error.stage + "]" : "";
          return stop(error.code || "failed", "the job failed: " + (error.message || "no reason given") + where);
        }
        setStatus(describeProgress(job), true);
        // A job that has just started will finish soon: poll quickly again after the queue's slow polls.
        if (job.status !== lastStatus) delay = POLL_FIRST_MS;
        lastStatus = job.status;
      }
      await sleep(delay);
      delay = Math.min(POLL_MAX_MS, delay * 1.5);
    }
  }

  // ---------------------------------------------------------------------------------------------- results

  function bar(label, probability, extraClass) {
    return el("li", { className: "answer-row" + (extraClass ? " " + extraClass : "") }, [
      el("span", { className: "answer-label", text: label }),
      el("span", { className: "bar", "aria-hidden": "true" }, [
        el("span", { className: "bar-fill", style: { width: (Math.max(0, Math.min(1, probability)) * 100) + "%" } }),
      ]),
      el("span", { className: "probability", text: percent(probability) }),
    ]);
  }

  function boxText(box) {
    return "[" + box.map((v) => Math.round(v)).join(", ") + "]";
  }

  // Boxes are placed in percent of the image size, so they follow the image when the layout rescales it.
  function drawBox(overlay, box, size, colour, caption) {
    const [x1, y1, x2, y2] = box;
    const node = el("div", {
      className: "box",
      title: caption,
      style: {
        left: (100 * x1 / size.width) + "%",
        top: (100 * y1 / size.height) + "%",
        width: (100 * (x2 - x1) / size.width) + "%",
        height: (100 * (y2 - y1) / size.height) + "%",
        borderColor: colour,
      },
    }, [el("span", { className: "box-label", style: { background: colour }, text: caption })]);
    overlay.append(node);
    return node;
  }

  function linkRowToBox(row, node) {
    const on = () => node.classList.add("highlight");
    const off = () => node.classList.remove("highlight");
    row.tabIndex = 0;
    row.addEventListener("mouseenter", on);
    row.addEventListener("mouseleave", off);
    row.addEventListener("focus", on);
    row.addEventListener("blur", off);
  }

  function renderTask(name, result, context) {
    const task = tasksByName.get(name) || { title: name, kind: guessKind(result) };
    const card = el("article", { className: "task-result", "data-task": name, "aria-labelledby": "result-" + name });
    card.append(el("h3", { id: "result-" + name }, [task.title + " ", el("code", { text: name })]));
    const list = el("ol", { className: "answers" });
    const kind = task.kind || guessKind(result);
    if (kind === "answer") {
      for (const answer of result.answers || []) list.append(bar(answer.answer, answer.probability));
    } else if (kind === "entailment" || kind === "binary") {
      card.append(el("p", { className: "verdict" }, ["Label: ", el("strong", { className: "label", text: result.label })]));
      for (const [label, p] of Object.entries(result.probabilities || {})) {
        list.append(bar(label, p, label === result.label ? "best" : ""));
      }
    } else if (kind === "score") {
      const ranking = result.ranking || [];
      ranking.forEach((index, rank) => {
        const file = context.files[index];
        const label = "#" + (rank + 1) + ": image " + index + (file ? " (" + file.name + ")" : "") +
          ", score " + Number(result.scores[index]).toFixed(3);
        const row = bar(label, result.probabilities[index], rank === 0 ? "best" : "");
        if (context.urls[index]) row.prepend(el("img", { className: "rank-thumb", src: context.urls[index], alt: "" }));
        list.append(row);
      });
    } else if (kind === "grounding" || kind === "pointing") {
      const entries = kind === "grounding" ? result.regions || [] : result.candidates || [];
      const colour = BOX_COLOURS[context.colourIndex++ % BOX_COLOURS.length];
      card.style.setProperty("--task-colour", colour);
      entries.forEach((entry, index) => {
        const best = kind === "pointing" ? index === result.best : index === 0;
        const what = kind === "grounding" ? "region " + entry.region : "candidate " + index;
        const row = bar(what + " " + boxText(entry.box), entry.score, best ? "best" : "");
        list.append(row);
        if (context.size) {
          const node = drawBox(context.overlay, entry.box, context.size, colour,
            name + " " + (kind === "grounding" ? "#" + (index + 1) : what) + " " + percent(entry.score));
          node.dataset.task = name;
          if (best) node.classList.add("best");
          linkRowToBox(row, node);
        }
      });
    } else {
      card.append(el("pre", { text: JSON.stringify(result, null, 2) }));
    }
    if (list.childElementCount) card.append(list);
    return card;
  }

  function guessKind(result) {
    if (result.answers) return "answer";
    if (result.regions) return "grounding";
    if (result.candidates) return "pointing";
    if (result.ranking) return "score";
    if (result.label) return Object.keys(result.probabilities || {}).length === 3 ? "entailment" : "binary";
    return "unknown";
  }

  function renderResult(job, files) {
    const result = job.result || {};
    const section = $("results");
    const overlay = $("overlay");
    overlay.replaceChildren();
    const image = $("result-image");
    const size = (result.images || [])[0];
    for (const url of resultUrls) URL.revokeObjectURL(url);
    const urls = files.map((file) => URL.createObjectURL(file));
    resultUrls = urls;
    if (urls.length) {
      image.src = urls[0];
      // Tall images: cap the width so the whole image fits in 70 % of the window's height.
      $("stage").style.maxWidth = size ? "calc(70vh * " + (size.width / size.height).toFixed(4) + ")" : "";
      $("figure").hidden = false;
      $("figure-caption").textContent = size
        ? "Image 0: " + size.width + " × " + size.height + " pixels, " + size.regions + " regions"
        : "Image 0";
    } else {
      $("figure").hidden = true;
    }
    const context = { files: files, urls: urls, overlay: overlay, size: size, colourIndex: 0 };
    const cards = $("task-results");
    cards.replaceChildren();
    for (const [name, taskResult] of Object.entries(result.tasks || {})) cards.append(renderTask(name, taskResult, context));

    const notice = $("notice");
    const model = result.model || {};
    notice.hidden = !model.notice;
    notice.textContent = model.notice || "";

    const timings = $("timings");
    timings.replaceChildren();
    for (const [key, value] of Object.entries(result.timings || {})) {
      timings.append(el("dt", { text: key.replace(/_s$/, "") }), el("dd", { text: Number(value).toFixed(3) + " s" }));
    }
    $("raw").textContent = JSON.stringify(job, null, 2);
    section.hidden = false;
    $("results-heading").focus();
  }

  // -------------------------------------------------------------------------------------------------- start

  $("image").addEventListener("change", refreshThumbnails);
  $("more-images").addEventListener("change", refreshThumbnails);
  form.addEventListener("submit", submitJob);
  setUpBoxEditor();
  loadTasks();
})();
