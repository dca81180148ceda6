// The web page's logic, plain JS without a build step: fetch the task list, submit the form to the JSON API,
// poll the job, render every task's answer and draw the grounding boxes over the first image. The collections
// view (#collections): add a folder of images to a collection, search it by caption, see the ranked thumbnails.
"use strict";

(function () {
  const API = {
    tasks: "api/v1/tasks",
    jobs: "api/v1/jobs",
    collections: "api/v1/collections",
    openapi: "api/v1/openapi.json",
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
    indexing: "indexing the images",
    searching: "scoring the collection's images",
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

  // An API error ({code, message}) shown in `box`, which takes focus so that screen readers announce it.
  function showErrorIn(box, code, message) {
    box.replaceChildren(
      el("strong", { text: "Error" + (code ? " (" + code + ")" : "") + ": " }),
      el("span", { className: "error-message", text: message || "something went wrong" })
    );
    box.hidden = false;
    box.focus();
  }

  function hideError(box) {
    box.hidden = true;
    box.replaceChildren();
  }

  function showError(code, message) {
    showErrorIn(errorBox, code, message);
  }

  function clearError() {
    hideError(errorBox);
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
        const what = (kind === "grounding" ? "region " + entry.region : "candidate " + index) +
          (entry.label ? " (" + entry.label + ")" : "");
        const row = bar(what + " " + boxText(entry.box), entry.score, best ? "best" : "");
        list.append(row);
        if (context.size) {
          const node = drawBox(context.overlay, entry.box, context.size, colour,
            name + " " + (kind === "grounding" ? "#" + (index + 1) : what) + (entry.label && kind === "grounding"
              ? " " + entry.label : "") + " " + percent(entry.score));
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

  // ------------------------------------------------------------------------------------------ collections view
  // Your own images, indexed once and searched by caption (docs/API.md, "Collections"): the name, its info, adding
  // a folder in chunks of the service's per-add limit with an indexing progress bar, searching, the ranked grid of
  // thumbnails with the grounded box, deleting an image or the whole collection.

  const COLLECTION_NAME = /^[a-z0-9][a-z0-9_-]{0,62}$/; // as service/collections.py NAME
  const COLLECTION_NAME_MESSAGE = "a collection name is 1 to 63 characters: lower-case letters, digits, '-' and '_', " +
    "starting with a letter or digit"; // the API's own message for invalid_collection
  const DEFAULT_UPLOAD_LIMIT = 16; // MAX_COLLECTION_UPLOAD_IMAGES's default, if the OpenAPI description is unreachable
  const IMAGE_SUFFIXES = /\.(jpe?g|png|gif|bmp|tiff?|webp|ppm|mpo)$/i; // as demo.py's IMAGE_SUFFIXES
  const HIT_HEIGHT_REM = 12; // a thumbnail in the grid is at most this tall
  const collectionError = $("collection-error");
  let uploadLimit = null; // learned from the OpenAPI description (maxItems), or from a too_many_uploads answer
  let openName = ""; // the collection whose info and results are shown
  let adding = false;

  class ApiError extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }

  function collectionUrl(name) {
    return API.collections + "/" + encodeURIComponent(name);
  }

  function showCollectionError(code, message) {
    showErrorIn(collectionError, code, message);
  }

  function clearCollectionError() {
    hideError(collectionError);
    $("collection-name").removeAttribute("aria-invalid");
  }

  // A fetch whose failure to connect becomes an ApiError like the service's own refusals.
  async function request(url, options) {
    try {
      return await fetch(url, Object.assign({ headers: { Accept: "application/json" }, cache: "no-store" }, options || {}));
    } catch (err) {
      throw new ApiError("network_error", "could not reach the service: " + err.message);
    }
  }

  async function refusal(response) {
    const error = await readError(response);
    const retry = response.headers.get("Retry-After");
    return new ApiError(error.code, error.message + (retry ? " (retry in " + retry + " s)" : ""));
  }

  // The name in the field, checked as the API checks it; null (and the error shown) when it is not valid.
  function collectionName() {
    const field = $("collection-name");
    const name = field.value.trim();
    if (!COLLECTION_NAME.test(name)) {
      showCollectionError("invalid_collection", COLLECTION_NAME_MESSAGE);
      field.setAttribute("aria-invalid", "true");
      field.focus();
      return null;
    }
    field.removeAttribute("aria-invalid");
    if (name !== openName) openCollection(name);
    return name;
  }

  function openCollection(name) {
    openName = name;
    $("search-results").hidden = true;
    $("hits").replaceChildren();
    $("search-status").textContent = "";
    $("index-status").textContent = "";
    $("index-progress-box").hidden = true;
  }

  function formatBytes(bytes) {
    if (bytes < 1024) return bytes + " bytes";
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let value = bytes;
    let unit = -1;
    do {
      value /= 1024;
      unit += 1;
    } while (value >= 1024 && unit < units.length - 1);
    return value.toFixed(value >= 100 ? 0 : 1) + " " + units[unit];
  }

  // GET /api/v1/collections/<name>: images, pending, bytes; a 404 is a collection not made yet, not an error.
  async function refreshInfo(name) {
    const box = $("collection-info");
    let response;
    try {
      response = await request(collectionUrl(name));
    } catch (err) {
      box.textContent = "";
      showCollectionError(err.code, err.message);
      return;
    }
    if (name !== openName) return; // another collection was opened meanwhile
    if (response.status === 404) {
      const error = await readError(response);
      box.dataset.state = "empty";
      box.replaceChildren(el("p", { text: "No collection “" + name + "” yet (" + error.code + "): add images to create it." }));
      return;
    }
    if (!response.ok) {
      const error = await refusal(response);
      box.textContent = "";
      showCollectionError(error.code, error.message);
      return;
    }
    const info = await response.json();
    box.dataset.state = "ready";
    const item = (field, term, text, value) => [el("dt", { text: term }),
      el("dd", { "data-field": field, "data-value": String(value), text: text })];
    box.replaceChildren(el("h3", { text: "Collection “" + info.name + "”" }), el("dl", {}, [
      ...item("images", "Images", String(info.images), info.images),
      ...item("pending", "Waiting to be indexed", String(info.pending), info.pending),
      ...item("bytes", "Stored", formatBytes(info.bytes), info.bytes),
    ]));
  }

  // The per-add limit, MAX_COLLECTION_UPLOAD_IMAGES, from the OpenAPI description's maxItems of the add's image field.
  async function learnUploadLimit() {
    if (uploadLimit) return uploadLimit;
    try {
      const response = await request(API.openapi);
      if (response.ok) {
        const spec = await response.json();
        const add = spec.paths["/api/v1/collections/{name}/images"].post;
        const limit = add.requestBody.content["multipart/form-data"].schema.properties.image.maxItems;
        if (Number.isInteger(limit) && limit > 0) uploadLimit = limit;
      }
    } catch (ignored) {
      // keep the default; a too_many_uploads answer still teaches the page the real limit
    }
    return uploadLimit || DEFAULT_UPLOAD_LIMIT;
  }

  // Polls a collection job until it is finished or failed; onProgress sees every other state. Throws ApiError when
  // the job is unknown (404) or the service cannot be reached for POLL_MAX_FAILURES polls in a row.
  async function waitForJob(url, onProgress) {
    let delay = POLL_FIRST_MS;
    let failures = 0;
    let lastStatus = "queued";
    for (;;) {
      let job = null;
      try {
        const response = await request(url);
        if (response.ok) {
          job = await response.json();
          failures = 0;
        } else if (response.status === 404 || ++failures >= POLL_MAX_FAILURES) {
          throw await refusal(response);
        }
      } catch (err) {
        if (err instanceof ApiError && err.code !== "network_error") throw err;
        if (++failures >= POLL_MAX_FAILURES) throw new ApiError("network_error", "lost contact with the service: " + err.message);
      }
      if (job) {
        if (job.status === "finished" || job.status === "failed") return job;
        onProgress(job);
        if (job.status !== lastStatus) delay = POLL_FIRST_MS;
        lastStatus = job.status;
      }
      await sleep(delay);
      delay = Math.min(POLL_MAX_MS, delay * 1.5);
    }
  }

  function jobFailure(job, what) {
    const error = job.error || {};
    const where = error.stage ? " [stage: " + error.stage + "]" : "";
    return new ApiError(error.code || "failed", what + " failed: " + (error.message || "no reason given") + where);
  }

  // ------------------------------------------------------------------------------------------- adding images

  function isImageFile(file) {
    return (file.type && file.type.startsWith("image/")) || IMAGE_SUFFIXES.test(file.name);
  }

  function setProgress(done, total, text) {
    const bar = $("index-progress");
    bar.max = Math.max(1, total);
    bar.value = Math.min(done, total);
    bar.setAttribute("aria-valuetext", done + " of " + total + " images indexed");
    if (text !== undefined && $("index-status").textContent !== text) $("index-status").textContent = text;
  }

  function lockAdding(locked) {
    adding = locked;
    for (const id of ["collection-folder", "collection-files", "delete-collection", "collection-open"]) $(id).disabled = locked;
    $("collection-name").readOnly = locked;
    $("drop-zone").classList.toggle("busy", locked);
    $("collection-add").setAttribute("aria-busy", locked ? "true" : "false");
  }

  async function addFiles(chosen) {
    if (adding) return;
    clearCollectionError();
    const name = collectionName();
    if (!name) return;
    const files = chosen.filter(isImageFile);
    const skipped = chosen.length - files.length;
    if (!files.length) {
      showCollectionError("no_images", chosen.length
        ? "none of the " + chosen.length + " chosen files is an image (JPEG, PNG, GIF, BMP, TIFF or WEBP)"
        : "no file was chosen");
      return;
    }
    const total = files.length;
    const skippedNote = skipped ? "; " + skipped + " file" + (skipped === 1 ? " that is not an image was" : "s that are not images were") + " skipped" : "";
    lockAdding(true);
    $("index-progress-box").hidden = false;
    setProgress(0, total, "Preparing " + total + " image" + (total === 1 ? "" : "s") + "…");
    let done = 0;
    let added = 0;
    try {
      let limit = await learnUploadLimit();
      while (done < total) {
        const chunk = files.slice(done, done + limit);
        const range = chunk.length === 1 ? "image " + (done + 1) : "images " + (done + 1) + "–" + (done + chunk.length);
        setProgress(done, total, "Uploading " + range + " of " + total + "…");
        const data = new FormData();
        for (const file of chunk) data.append("image", file, file.name);
        const response = await request(collectionUrl(name) + "/images", { method: "POST", body: data });
        if (response.status !== 202) {
          const error = await refusal(response);
          const smaller = error.code === "too_many_uploads" && /limit per request is (\d+)/.exec(error.message);
          if (smaller && Number(smaller[1]) > 0 && Number(smaller[1]) < chunk.length) {
            limit = uploadLimit = Number(smaller[1]); // the service's limit is lower than the page assumed
            continue;
          }
          // "image 2: …" counts from the chunk's first image: say which file that is.
          const index = /^image (\d+):/.exec(error.message);
          const file = index ? chunk[Number(index[1])] : null;
          throw new ApiError(error.code, error.message + (file ? " (file " + (file.webkitRelativePath || file.name) + ")" : ""));
        }
        const job = await response.json();
        const url = response.headers.get("Location") || job.url || API.jobs + "/" + job.id;
        const final = await waitForJob(url, (progress) => {
          const detail = /^(\d+)\/(\d+)$/.exec(progress.stage_detail || "");
          if (progress.status === "queued") {
            setProgress(done, total, "Uploaded " + range + " of " + total + "; waiting for a worker…");
          } else if (progress.stage === "indexing" && detail) {
            const now = done + Number(detail[1]);
            setProgress(now, total, "Indexing: " + now + " of " + total + " images…");
          }
        });
        if (final.status === "failed") throw jobFailure(final, "indexing " + range);
        done += chunk.length;
        added += (final.result && final.result.added) || 0;
        setProgress(done, total, "Indexing: " + done + " of " + total + " images…");
        refreshInfo(name);
      }
      setProgress(total, total, "Indexed " + total + " of " + total + " images: " + added + " new, " +
        (total - added) + " already in the collection" + skippedNote + ".");
    } catch (err) {
      setProgress(done, total, "Stopped: " + done + " of " + total + " images indexed" + skippedNote + ".");
      showCollectionError(err.code || "error", err.message);
    } finally {
      lockAdding(false);
      $("collection-folder").value = "";
      $("collection-files").value = "";
      refreshInfo(name);
    }
  }

  function byPath(a, b) {
    const pa = a.webkitRelativePath || a.name;
    const pb = b.webkitRelativePath || b.name;
    return pa < pb ? -1 : pa > pb ? 1 : 0;
  }

  // A dropped folder arrives as a directory entry: walk it (readEntries answers in batches until an empty one).
  async function entryFiles(entry, out) {
    if (entry.isFile) {
      out.push(await new Promise((resolve, reject) => entry.file(resolve, reject)));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await entryFiles(child, out);
      }
    }
  }

  async function droppedFiles(transfer) {
    // The items must be read during the drop event itself: take the entries (or files) synchronously first.
    const entries = [];
    const plain = [];
    for (const item of Array.from(transfer.items || [])) {
      if (item.kind !== "file") continue;
      const entry = item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
      if (entry) entries.push(entry);
      else if (item.getAsFile()) plain.push(item.getAsFile());
    }
    if (!entries.length && !plain.length) plain.push(...Array.from(transfer.files || []));
    const files = [...plain];
    for (const entry of entries) await entryFiles(entry, files);
    return files;
  }

  function setUpDropZone() {
    const zone = $("drop-zone");
    const hasFiles = (event) => Array.from(event.dataTransfer ? event.dataTransfer.types : []).includes("Files");
    zone.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = adding ? "none" : "copy";
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) zone.classList.remove("over");
    });
    zone.addEventListener("drop", async (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (adding) return;
      let files;
      try {
        files = await droppedFiles(event.dataTransfer);
      } catch (err) {
        showCollectionError("unreadable_drop", "the dropped files could not be read: " + err.message);
        return;
      }
      await addFiles(files.sort(byPath));
    });
    for (const id of ["collection-folder", "collection-files"]) {
      $(id).addEventListener("change", () => addFiles(Array.from($(id).files).sort(byPath)));
    }
  }

  // --------------------------------------------------------------------------------------------- searching

  function thumbnailUrl(name, imageId) {
    return collectionUrl(name) + "/images/" + encodeURIComponent(imageId) + "/thumbnail";
  }

  async function searchCollection(event) {
    event.preventDefault();
    clearCollectionError();
    const name = collectionName();
    if (!name) return;
    const text = $("search-text").value;
    const data = new FormData();
    data.append("text", text);
    if ($("search-top-k").value.trim()) data.append("top_k", $("search-top-k").value.trim());
    data.append("ground", $("search-ground").checked ? "true" : "false");
    const status = $("search-status");
    const button = $("search-button");
    button.disabled = true;
    status.classList.add("busy");
    status.textContent = "Searching…";
    $("search-results").hidden = true;
    const started = performance.now();
    try {
      const response = await request(collectionUrl(name) + "/search", { method: "POST", body: data });
      if (response.status !== 202) throw await refusal(response);
      const job = await response.json();
      const url = response.headers.get("Location") || job.url || API.jobs + "/" + job.id;
      const final = await waitForJob(url, (progress) => {
        const line = describeProgress(progress);
        if (status.textContent !== line) status.textContent = line;
      });
      if (final.status === "failed") throw jobFailure(final, "the search");
      if (name !== openName) return;
      status.textContent = "Finished in " + ((performance.now() - started) / 1000).toFixed(1) + " s.";
      renderHits(name, text.trim(), final.result || {});
    } catch (err) {
      status.textContent = "";
      showCollectionError(err.code || "error", err.message);
    } finally {
      status.classList.remove("busy");
      button.disabled = false;
    }
  }

  function renderHits(name, text, result) {
    const hits = result.hits || [];
    const list = $("hits");
    list.replaceChildren(...hits.map((hit) => renderHit(name, hit)));
    const grounded = result.grounded ? ", with the box the caption refers to" : "";
    $("search-summary").textContent = hits.length
      ? "The " + hits.length + " best of " + result.scored + " images for “" + text + "”, best first" + grounded +
        ". Score: the retrieval logit (" + result.task + ")."
      : "No image to show.";
    $("search-results").hidden = false;
    $("search-heading").focus();
  }

  function renderHit(name, hit) {
    const score = Number(hit.score);
    const item = el("li", { className: "hit", "data-image-id": hit.image_id, "data-rank": String(hit.rank),
      "data-score": String(hit.score), "aria-labelledby": "hit-caption-" + hit.rank });
    const image = el("img", { className: "hit-thumb", src: thumbnailUrl(name, hit.image_id), alt: "" });
    const overlay = el("div", { className: "overlay" });
    const stage = el("div", { className: "stage hit-stage" }, [image, overlay]);
    if (hit.width && hit.height) stage.style.maxWidth = "calc(" + HIT_HEIGHT_REM + "rem * " + (hit.width / hit.height).toFixed(4) + ")";
    const caption = el("p", { className: "hit-caption", id: "hit-caption-" + hit.rank }, [
      el("span", { className: "hit-rank", text: "#" + hit.rank }), " ",
      el("span", { className: "hit-score", text: "score " + score.toFixed(4) }),
    ]);
    // The box is in original-image pixels; placed in percent of the original size, it lands on the same spot of
    // the thumbnail (the original scaled down, aspect kept), whatever size the grid shows it at.
    if (Array.isArray(hit.box) && hit.width && hit.height) {
      const what = (hit.label ? hit.label + " " : "") + percent(hit.box_score);
      const node = drawBox(overlay, hit.box, { width: hit.width, height: hit.height }, BOX_COLOURS[0], what);
      node.classList.add("best", "hit-box");
      if (hit.label) caption.append(" ", el("span", { className: "hit-label", text: hit.label }));
      caption.append(" ", el("span", { className: "hit-box-score", text: "box " + boxText(hit.box) + " " + percent(hit.box_score) }));
    }
    image.alt = "Result " + hit.rank + ", image " + hit.image_id.slice(0, 8) + (hit.label ? ", " + hit.label : "");
    const remove = el("button", { type: "button", className: "secondary hit-delete", text: "Delete",
      "aria-label": "Delete result " + hit.rank + " (image " + hit.image_id.slice(0, 8) + ") from the collection" });
    remove.addEventListener("click", () => deleteImage(name, hit, item));
    item.append(el("figure", { className: "hit-figure" }, [stage, el("figcaption", {}, [caption])]), remove);
    return item;
  }

  // ---------------------------------------------------------------------------------------------- deleting

  async function deleteImage(name, hit, item) {
    clearCollectionError();
    if (!window.confirm("Delete image " + hit.image_id.slice(0, 8) + "… (result " + hit.rank + ") from collection “" +
      name + "”? This cannot be undone.")) return;
    const status = $("search-status");
    try {
      const url = collectionUrl(name) + "/images/" + encodeURIComponent(hit.image_id);
      const response = await request(url, { method: "DELETE" });
      if (!response.ok) throw await refusal(response);
      const next = item.nextElementSibling || item.previousElementSibling;
      item.remove();
      status.textContent = "Deleted image " + hit.image_id.slice(0, 8) + "… (result " + hit.rank + ").";
      if (next) next.querySelector("button").focus();
      else $("search-heading").focus();
      refreshInfo(name);
    } catch (err) {
      showCollectionError(err.code || "error", err.message);
    }
  }

  async function deleteCollection() {
    clearCollectionError();
    const name = collectionName();
    if (!name) return;
    if (!window.confirm("Delete collection “" + name + "” and every image in it? This cannot be undone.")) return;
    try {
      const response = await request(collectionUrl(name), { method: "DELETE" });
      if (!response.ok) throw await refusal(response);
      const body = await response.json();
      openCollection(name);
      const box = $("collection-info");
      box.dataset.state = "deleted";
      box.replaceChildren(el("p", { text: "Deleted collection “" + name + "” (" + body.deleted + " image" +
        (body.deleted === 1 ? "" : "s") + ")." }));
    } catch (err) {
      showCollectionError(err.code || "error", err.message);
    }
  }

  function setUpCollections() {
    $("collection-form").addEventListener("submit", (event) => {
      event.preventDefault();
      clearCollectionError();
      const name = collectionName();
      if (name) refreshInfo(name);
    });
    $("search-form").addEventListener("submit", searchCollection);
    $("delete-collection").addEventListener("click", deleteCollection);
    setUpDropZone();
  }

  // ------------------------------------------------------------------------------------------------- views

  // Two views in one page: #collections shows the collections, anything else the ask form.
  function showView(moveFocus) {
    const collections = location.hash === "#collections";
    $("ask-view").hidden = collections;
    $("collections-view").hidden = !collections;
    for (const [id, current] of [["nav-ask", !collections], ["nav-collections", collections]]) {
      if (current) $(id).setAttribute("aria-current", "page");
      else $(id).removeAttribute("aria-current");
    }
    if (moveFocus && collections) $("collections-heading").focus();
  }

  // -------------------------------------------------------------------------------------------------- start

  $("image").addEventListener("change", refreshThumbnails);
  $("more-images").addEventListener("change", refreshThumbnails);
  form.addEventListener("submit", submitJob);
  setUpBoxEditor();
  setUpCollections();
  window.addEventListener("hashchange", () => showView(true));
  showView(false);
  loadTasks();
})();
