// The studio talks to the same API as any client: /canny, /generate_stream and,
// for every limit and default, the OpenAPI schema at /docs.json.
const form = document.querySelector("#studio");
const paramInputs = [...form.querySelectorAll("[data-param]")];
const $ = (selector) => document.querySelector(selector);
let image = null;
let uploadUrl = null; // the upload, shown by the layers that take it as it is
let running = null; // the AbortController of the generation in progress

// Limits and defaults live in the Service's request model; read them, never copy them.
async function applySchema() {
  const spec = await (await fetch("../docs.json")).json();
  const fields = spec.components.schemas.Params.properties;
  for (const input of paramInputs) {
    const field = fields[input.name];
    const rule = field.anyOf ? field.anyOf.find((option) => option.type !== "null") : field;
    if (input.tagName === "SELECT") {
      input.replaceChildren(...rule.enum.map((value) => new Option(value)));
    }
    for (const [attribute, key] of [["min", "minimum"], ["max", "maximum"], ["maxLength", "maxLength"]]) {
      if (rule[key] !== undefined) input[attribute] = rule[key];
    }
    if (field.default !== undefined && field.default !== null) input.value = field.default;
    if (field.description) input.title = field.description;
  }
  applyAdapterSchema(spec.components.schemas, fields);
  applyControlSchema(spec.components.schemas, fields);
  previews = fields.preview_every["x-available"] === true;
  const strength = fields.strength.anyOf.find((option) => option.type !== "null");
  $("#strength").max = strength.maximum;
  $("#strength").min = $("#strength").step; // above its exclusive minimum, 0
  $("#strength").value = fields.strength["x-default-by-mode"]["image-to-image"];
  $("#strength").title = fields.strength.description;
  showSliders();
}

// Live previews: where the server makes them, the picture forms in the result's frame.
let previews = false;
const PREVIEWS_PER_GENERATION = 10;

function previewEvery(steps) {
  return Math.max(1, Math.round(steps / PREVIEWS_PER_GENERATION));
}

function showForming({ step, total, image: webp }) {
  showImage("result", `data:image/webp;base64,${webp}`);
  $("#result-figure").classList.add("forming");
  $("#result-figure .note").textContent = `(forming: step ${step} of ${total})`;
}

// LoRA adapters: the names the server declares, each with the preset a few-step adapter
// brings. Choosing one fills in its preset, since the studio sends every field it shows.
let presets = {};
let defaults = {};
function applyAdapterSchema(schemas, fields) {
  const choice = schemas.LoraChoice?.properties;
  if (!choice?.name?.enum) return; // the server declares no adapters
  presets = fields.loras["x-presets"] ?? {};
  defaults = Object.fromEntries(paramInputs.map((input) => [input.name, input.value]));
  $("#lora").append(...choice.name.enum.map((name) => new Option(name)));
  $("#lora_scale").min = choice.scale.minimum;
  $("#lora_scale").max = choice.scale.maximum;
  $("#lora").title = fields.loras.description;
}

function choosePreset() {
  const preset = presets[$("#lora").value] ?? {};
  for (const input of paramInputs) {
    if (input.name in defaults && ["num_inference_steps", "guidance_scale", "scheduler"].includes(input.name)) {
      input.value = preset[input.name] ?? defaults[input.name];
    }
  }
}

function params(names) {
  const values = {};
  for (const input of paramInputs) {
    if (names && !names.includes(input.name)) continue;
    if (input.value === "") continue;
    // With layers, each has its own scale and preprocessor: the API refuses the one-control fields.
    if (layers.length && ONE_CONTROL.includes(input.name)) continue;
    values[input.name] = input.type === "text" || input.tagName !== "INPUT" ? input.value : Number(input.value);
  }
  if (!names && $("#lora").value) {
    values.loras = [{ name: $("#lora").value, scale: Number($("#lora_scale").value) }];
  }
  if (!names && layers.length) values.controls = layers.map(controlOf);
  return values;
}

// Control layers: several controls, each with its type, its image, its scale and its window.
// With none, a request keeps the one Canny control of the upload, as it always did.
const ONE_CONTROL = ["preprocessor", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"];
// What the front derives from the upload, by type (sdxl_controlnet/controls.py, DERIVED): the
// schema's preprocessor enum names every type, most only so that the server can refuse them.
const DERIVED = { canny: "the upload's edges", tile: "the upload, blurred" };
const layers = []; // {element, picture}: picture is the layer's own image file
let control = null; // the schema's Control: the offered types, each setting's bounds and default
let maxLayers = 0;
let edgesUrl = null; // the upload's Canny edges as last previewed, which canny layers show too

function applyControlSchema(schemas, fields) {
  if (!fields.controls) return; // a server from before layers
  control = schemas[fields.controls.items.$ref.split("/").pop()].properties;
  maxLayers = fields.controls.maxItems;
  $("#controls").title = fields.controls.description;
  $("#controls").hidden = false;
  showLayers();
}

// A number input held to a schema rule; an exclusive bound becomes the nearest step inside it.
function bound(input, rule) {
  const step = Number(input.step);
  if (rule.minimum !== undefined) input.min = rule.minimum;
  if (rule.exclusiveMinimum !== undefined) input.min = rule.exclusiveMinimum + step;
  if (rule.maximum !== undefined) input.max = rule.maximum;
  if (rule.exclusiveMaximum !== undefined) input.max = rule.exclusiveMaximum - step;
  input.value = rule.default;
  input.title = rule.description;
}

const part = (layer, name) => layer.element.querySelector(`.${name}`);

function addLayer() {
  const layer = { element: $("#layer").content.firstElementChild.cloneNode(true), picture: null };
  part(layer, "type").replaceChildren(...control.type.enum.map((kind) => new Option(kind)));
  part(layer, "type").title = control.type.description;
  for (const name of ["scale", "start", "end"]) bound(part(layer, name), control[name]);
  offerSources(layer);
  part(layer, "type").addEventListener("change", () => {
    offerSources(layer);
    showLayers();
  });
  part(layer, "source").addEventListener("change", showLayers);
  part(layer, "picture").addEventListener("change", (event) => readPicture(layer, event.target.files[0]));
  part(layer, "remove").addEventListener("click", () => {
    layers.splice(layers.indexOf(layer), 1);
    layer.element.remove();
    showLayers();
    schedulePreview(); // the edge map follows the preprocessor select again
  });
  layers.push(layer);
  $("#layers").append(layer.element);
  showLayers();
  schedulePreview();
}

// Where a layer's image comes from: derived from the upload where its type allows, the upload
// as it is, or a picture of its own (sent as it is).
function offerSources(layer) {
  const kind = part(layer, "type").value;
  const source = part(layer, "source");
  const chosen = source.value;
  source.replaceChildren(
    ...(kind in DERIVED ? [new Option(DERIVED[kind], kind)] : []),
    new Option("the upload as it is", "none"),
    new Option("its own picture", "own"),
  );
  // A type with nothing derived here wants its own picture: an upload is seldom a depth map.
  const kept = [...source.options].some((option) => option.value === chosen);
  source.value = kept ? chosen : kind in DERIVED ? kind : "own";
}

function readPicture(layer, file) {
  if (!file) return;
  layer.picture = file;
  layer.pictureUrl = URL.createObjectURL(file);
  showLayers();
}

// A layer's own picture goes as a file part of the form, which its control names: a form's
// text field, params included, holds at most 1 MiB.
const partOf = (layer) => `control_${layers.indexOf(layer)}`;

function controlPictures() {
  const own = layers.filter((layer) => part(layer, "source").value === "own" && layer.picture);
  return Object.fromEntries(own.map((layer) => [partOf(layer), layer.picture]));
}

function controlOf(layer) {
  const values = { type: part(layer, "type").value };
  for (const name of ["scale", "start", "end"]) {
    if (part(layer, name).value !== "") values[name] = Number(part(layer, name).value);
  }
  const source = part(layer, "source").value;
  if (source === "own") return { ...values, image: partOf(layer), preprocessor: "none" };
  return { ...values, preprocessor: source };
}

function showLayers() {
  for (const input of paramInputs) {
    if (ONE_CONTROL.includes(input.name)) input.disabled = layers.length > 0;
  }
  $("#add_layer").disabled = !control || layers.length >= maxLayers;
  $("#add_layer").title = `At most ${maxLayers} layers.`;
  for (const layer of layers) {
    const source = part(layer, "source").value;
    part(layer, "own").hidden = source !== "own";
    // Tile shows the upload itself: its blur only softens what the preview would show.
    const url = source === "own" ? layer.pictureUrl : source === "canny" ? edgesUrl : uploadUrl;
    const preview = layer.element.querySelector("img");
    if (url) preview.src = url;
    preview.hidden = !url;
    preview.closest("figure").classList.toggle("empty", !url);
  }
  showSliders();
}

function request(path, values, signal, pictures = {}) {
  const body = new FormData();
  body.append("image", image);
  for (const [name, file] of Object.entries(pictures)) body.append(name, file, file.name ?? `${name}.png`);
  body.append("params", JSON.stringify(values));
  return fetch(`..${path}`, { method: "POST", body, signal });
}

// Image-to-image and inpainting: a start picture (another one, or the upload itself), its
// strength, and a mask painted over it in the picture's own pixels: white repaints.
const mask = $("#mask");
const pen = mask.getContext("2d", { willReadFrequently: true });
let startFile = null;
let lastPoint = null;

function useStart() {
  const on = $("#use_start").checked;
  $("#init_image").disabled = $("#strength").disabled = !on;
  $(".paint").hidden = $(".brush").hidden = !on;
  if (on) showStartPicture();
}

function showStartPicture() {
  const file = startFile ?? image;
  if (!file) return;
  const picture = $("#start_picture");
  picture.onload = () => {
    const scale = Math.min(1, 1024 / Math.max(picture.naturalWidth, picture.naturalHeight));
    const [width, height] = [picture.naturalWidth, picture.naturalHeight].map((side) => Math.round(side * scale));
    if (mask.width !== width || mask.height !== height) [mask.width, mask.height] = [width, height]; // clears it
  };
  picture.src = URL.createObjectURL(file);
}

function canvasPoint(event) {
  const box = mask.getBoundingClientRect();
  return [(event.clientX - box.left) * mask.width / box.width, (event.clientY - box.top) * mask.height / box.height];
}

function paint(event) {
  if (!lastPoint) return;
  const point = canvasPoint(event);
  pen.globalCompositeOperation = $("#erase").checked ? "destination-out" : "source-over";
  pen.strokeStyle = "#f0f";
  pen.lineCap = pen.lineJoin = "round";
  pen.lineWidth = Number($("#brush").value) * mask.width / mask.getBoundingClientRect().width;
  pen.beginPath();
  pen.moveTo(...lastPoint);
  pen.lineTo(...point);
  pen.stroke();
  lastPoint = point;
}

function invertMask() {
  const pixels = pen.getImageData(0, 0, mask.width, mask.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    pixels.data.set([255, 0, 255, 255 - pixels.data[i + 3]], i);
  }
  pen.putImageData(pixels, 0, 0);
}

// The mask as the API takes it: a PNG, white where painted, black elsewhere; null if unpainted.
async function maskFile() {
  const painted = pen.getImageData(0, 0, mask.width, mask.height).data;
  const pixels = new ImageData(mask.width, mask.height);
  let any = false;
  for (let i = 0; i < painted.length; i += 4) {
    const value = painted[i + 3] >= 128 ? 255 : 0;
    any ||= value > 0;
    pixels.data.set([value, value, value, 255], i);
  }
  if (!any) return null;
  const canvas = new OffscreenCanvas(mask.width, mask.height);
  canvas.getContext("2d").putImageData(pixels, 0, 0);
  return canvas.convertToBlob({ type: "image/png" });
}

async function startPictures(values) {
  if (!$("#use_start").checked) return {};
  values.strength = Number($("#strength").value);
  const pictures = startFile ? { init_image: startFile } : {};
  const painted = await maskFile();
  return painted ? { ...pictures, mask: painted } : pictures;
}

// The API answers {"error"} or, for a rule a field broke, {"error", "detail": [{loc, msg}]}.
async function errorMessage(response) {
  let body;
  try {
    body = await response.json();
  } catch {
    return `The server answered ${response.status} ${response.statusText}.`;
  }
  const error = Array.isArray(body) ? body[0] : body;
  if (!error.detail) return error.error;
  return error.detail.map((item) => `${item.loc.join(".")}: ${item.msg}`).join("\n");
}

function showError(message) {
  $("#error").textContent = message;
}

// An image figure is empty (nothing yet), current, or stale: from before a request that failed.
function showImage(id, url) {
  const img = $(`#${id}`);
  img.src = url;
  img.hidden = false;
  markStale(id, false);
  img.closest("figure").classList.remove("empty");
}

function markStale(id, stale) {
  const figure = $(`#${id}`).closest("figure");
  if (figure.classList.contains("empty")) return;
  const unfinished = figure.classList.contains("forming");
  figure.classList.remove("forming");
  figure.classList.toggle("stale", stale);
  const why = unfinished ? "(a preview: stopped before the result)" : "(previous, not of the current settings)";
  figure.querySelector(".note").textContent = stale ? why : "";
}

function showSliders() {
  const edgeDetection = layers.length
    ? layers.some((layer) => part(layer, "source").value === "canny")
    : $("#preprocessor").value !== "none";
  $("#low_threshold").disabled = $("#high_threshold").disabled = !edgeDetection;
  for (const output of form.querySelectorAll("output")) {
    output.value = $(`#${output.htmlFor}`).value;
  }
}

// The edge-map preview follows the sliders, once they rest for a moment.
let previewTimer;
let previewRequest;
function schedulePreview() {
  showSliders();
  clearTimeout(previewTimer);
  previewTimer = setTimeout(preview, 250);
}

async function preview() {
  if (!image) return;
  previewRequest?.abort();
  previewRequest = new AbortController();
  try {
    const values = params(["low_threshold", "high_threshold", "preprocessor"]);
    if (layers.length) values.preprocessor = "canny"; // the edges that canny layers get
    const response = await request("/canny", values, previewRequest.signal);
    if (!response.ok) {
      markStale("edges", true);
      return showError(await errorMessage(response));
    }
    showError("");
    const url = URL.createObjectURL(await response.blob());
    showImage("edges", url);
    edgesUrl = values.preprocessor === "none" ? null : url;
    showLayers();
  } catch (error) {
    if (error.name === "AbortError") return;
    markStale("edges", true);
    showError(`Preview failed: ${error.message}`);
  }
}

function chooseImage(file) {
  if (!file) return;
  image = file;
  uploadUrl = URL.createObjectURL(file);
  showLayers();
  $("#drop span").textContent = file.name;
  if ($("#use_start").checked && !startFile) showStartPicture();
  preview();
}

// Server-sent events from a POST: EventSource only GETs, so parse the body here.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      yield {
        event: /^event: (.*)$/m.exec(block)[1],
        data: JSON.parse(/^data: (.*)$/m.exec(block)[1]),
      };
    }
  }
}

function showProgress({ step, total, elapsed_s }) {
  $("#progress").max = total;
  $("#progress").value = step;
  $("#status").textContent = step ? `Step ${step} of ${total} · ${elapsed_s} s` : "Waiting for the GPU…";
}

function showResult(result) {
  const [first] = result.images;
  const url = `data:image/${result.params.output_format};base64,${first.image}`;
  showImage("result", url);
  showImage("edges", `data:image/png;base64,${result.edge_map}`);
  $("#seed").textContent = `Seed ${first.seed}`;
  $("#download").href = url;
  $("#download").download = `sdxl-controlnet-${first.seed}.${result.params.output_format}`;
  $("#download").hidden = false;
  $("#status").textContent = `Done in ${(result.timings_ms.generate / 1000).toFixed(1)} s · ${result.params.mode}`;
}

async function generate(event) {
  event.preventDefault();
  if (running) return running.abort(); // the button reads "Stop": leaving stops the GPU too
  if (!image) return showError("Choose an image first.");
  const unpictured = layers.findIndex((layer) => part(layer, "source").value === "own" && !layer.picture);
  if (unpictured >= 0) return showError(`Layer ${unpictured + 1}: choose its picture, or make it from the upload.`);
  showError("");
  running = new AbortController();
  $("#generate").textContent = "Stop";
  // Until this request succeeds, what is shown is the previous result.
  markStale("result", true);
  $("#download").hidden = true;
  $("#progress").value = 0;
  let done = false;
  try {
    const values = params();
    if (previews) values.preview_every = previewEvery(values.num_inference_steps);
    const pictures = { ...(await startPictures(values)), ...controlPictures() };
    const response = await request("/generate_stream", values, running.signal, pictures);
    if (!response.ok) return showError(await errorMessage(response));
    for await (const { event: kind, data } of serverSentEvents(response)) {
      if (kind === "progress") showProgress(data);
      else if (kind === "preview") showForming(data);
      else if (kind === "result") {
        showResult(data);
        done = true;
      }
      else if (kind === "error") showError(data.error);
    }
  } catch (error) {
    showError(error.name === "AbortError" ? "Stopped." : `Generation failed: ${error.message}`);
  } finally {
    if (!done) {
      $("#status").textContent = "";
      markStale("result", true); // a preview left unfinished is no result either
    }
    running = null;
    $("#generate").textContent = "Generate";
  }
}

$("#image").addEventListener("change", (event) => chooseImage(event.target.files[0]));
$("#drop").addEventListener("dragover", (event) => {
  event.preventDefault();
  $("#drop").classList.add("over");
});
$("#drop").addEventListener("dragleave", () => $("#drop").classList.remove("over"));
$("#drop").addEventListener("drop", (event) => {
  event.preventDefault();
  $("#drop").classList.remove("over");
  chooseImage(event.dataTransfer.files[0]);
});
$("#low_threshold").addEventListener("input", schedulePreview);
$("#high_threshold").addEventListener("input", schedulePreview);
$("#preprocessor").addEventListener("change", schedulePreview);
$("#lora").addEventListener("change", choosePreset);
$("#add_layer").addEventListener("click", addLayer);
$("#use_start").addEventListener("change", useStart);
$("#init_image").addEventListener("change", (event) => {
  startFile = event.target.files[0] ?? null;
  showStartPicture();
});
$("#strength").addEventListener("input", showSliders);
mask.addEventListener("pointerdown", (event) => {
  mask.setPointerCapture(event.pointerId);
  lastPoint = canvasPoint(event);
  paint(event); // a dot
});
mask.addEventListener("pointermove", paint);
mask.addEventListener("pointerup", () => (lastPoint = null));
$("#clear_mask").addEventListener("click", () => pen.clearRect(0, 0, mask.width, mask.height));
$("#invert_mask").addEventListener("click", invertMask);
form.addEventListener("submit", generate);
applySchema().catch((error) => showError(`Could not read the API schema: ${error.message}`));
