// The evaluation report's interactive 3D Gaussian viewer (geco/eval/report.py writes the page).
//
// Spark (@sparkjsdev/spark, a maintained three.js Gaussian-splat renderer) draws one standard 3DGS
// .ply at a time into one WebGL canvas (browsers cap live WebGL contexts, so the page never makes one
// per model). esbuild bundles Spark, three and this file into ONE classic script (dist/geco-viewer.js,
// global `GecoViewer`): module scripts and fetch() are blocked from file://, classic <script src> is
// not, so the page works opened as a file as well as from any static server, with no network. Spark's
// sorting worker and its WebAssembly are inlined in the bundle (a blob: worker, no SharedArrayBuffer),
// so no cross-origin-isolation headers are needed either.
//
// Splat data: the report writes each .ply as a "sidecar" script, splats/<object>/<model>.js, holding
//     (window.GecoSplats = window.GecoSplats || {})["<object>/<model>"] = "<base64 of the .ply>";
// show(key, src) loads that script once (lazily: only the model a person picks) and hands the bytes
// to Spark.
//
// Frame: the project's world frame is z up with objects inside [-0.5, 0.5]^3 (DESIGN.md); the camera
// orbits the origin with z up, so the Gaussians are shown as they were generated, unrotated.
//
// State for people and tests: the container's data-state is "loading", "ready" (the model's first
// frames are drawn once Spark shows its splats, see splatsShown) or "error" (with the reason in the
// status line and on the console), and data-shown names the key on screen.
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { SparkRenderer, SplatMesh } from "@sparkjsdev/spark";

const CAMERA = { fovDeg: 40, radius: 2.2, elevationDeg: 20 };
const FRAMES_BEFORE_READY = 3;

function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

const loadedScripts = new Map(); // src -> Promise, so each sidecar is loaded once

function loadScript(src) {
  if (!loadedScripts.has(src)) {
    loadedScripts.set(src, new Promise((resolve, reject) => {
      const el = document.createElement("script");
      el.src = src;
      el.onload = () => resolve();
      el.onerror = () => {
        loadedScripts.delete(src);
        reject(new Error(`could not load ${src}`));
      };
      document.head.appendChild(el);
    }));
  }
  return loadedScripts.get(src);
}

class Viewer {
  constructor(container, status) {
    this.container = container;
    this.status = status;
    this.mesh = null;
    this.request = 0; // the latest show() call wins when several overlap
    const w = container.clientWidth || 480;
    const h = container.clientHeight || 480;
    // preserveDrawingBuffer: the canvas can be read back (a test does; a person can save a picture)
    this.renderer = new THREE.WebGLRenderer({ antialias: false, preserveDrawingBuffer: true });
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    this.renderer.setSize(w, h);
    this.renderer.setClearColor(0xffffff, 1);
    container.appendChild(this.renderer.domElement);
    // a lost WebGL context (a GPU reset, or memory pressure on a software rasterizer) draws nothing:
    // say so rather than stand "ready" over a blank canvas
    this.renderer.domElement.addEventListener("webglcontextlost", () => {
      this.container.dataset.state = "error";
      this.setStatus("the browser lost this page's WebGL context: reload the page to see the model");
      console.error("GECO viewer: WebGL context lost");
    });
    this.scene = new THREE.Scene();
    this.spark = new SparkRenderer({ renderer: this.renderer });
    this.scene.add(this.spark);
    this.camera = new THREE.PerspectiveCamera(CAMERA.fovDeg, w / h, 0.01, 100);
    this.camera.up.set(0, 0, 1);
    const el = THREE.MathUtils.degToRad(CAMERA.elevationDeg);
    this.camera.position.set(CAMERA.radius * Math.cos(el), 0, CAMERA.radius * Math.sin(el));
    this.controls = new OrbitControls(this.camera, this.renderer.domElement);
    this.controls.target.set(0, 0, 0);
    this.controls.enableDamping = true;
    this.controls.autoRotate = true; // until the person takes over
    this.controls.addEventListener("start", () => { this.controls.autoRotate = false; });
    this.controls.update();
    this.framesLeft = 0;
    this.renderer.setAnimationLoop(() => this.frame());
  }

  frame() {
    this.controls.update();
    this.renderer.render(this.scene, this.camera);
    if (this.framesLeft > 0 && this.splatsShown() && --this.framesLeft === 0) this.container.dataset.state = "ready";
  }

  // Spark sorts the splats in a web worker and swaps in the accumulator it displays when a sort lands,
  // some frames after a mesh joins the scene (many on a slow machine): until then the canvas shows
  // nothing, or the previous model. These are SparkRenderer fields of the pinned Spark 2.2
  // (package.json); without them a few frames stand in.
  splatsShown() {
    const display = this.spark.display;
    if (!display || !Array.isArray(display.mapping)) return true;
    return this.spark.activeSplats > 0 && display.mapping.some((m) => m.node === this.mesh);
  }

  setStatus(text) {
    if (this.status) this.status.textContent = text;
  }

  async show(key, src) {
    const request = ++this.request;
    this.container.dataset.state = "loading";
    this.setStatus(`loading ${key} …`);
    try {
      await loadScript(src);
      const data = (window.GecoSplats || {})[key];
      if (typeof data !== "string") throw new Error(`${src} holds no splats for ${key}`);
      const mesh = new SplatMesh({ fileBytes: base64ToBytes(data), fileName: `${key}.ply` });
      await mesh.initialized;
      if (request !== this.request) { mesh.dispose(); return; } // a later pick replaced this one
      if (this.mesh) { this.scene.remove(this.mesh); this.mesh.dispose(); }
      this.mesh = mesh;
      this.scene.add(mesh);
      this.container.dataset.shown = key;
      this.setStatus(`${key}: drag to orbit, scroll to zoom`);
      this.framesLeft = FRAMES_BEFORE_READY;
    } catch (err) {
      if (request !== this.request) return;
      this.container.dataset.state = "error";
      this.setStatus(`cannot show ${key}: ${err.message || err}`);
      console.error(`GECO viewer: cannot show ${key}:`, err);
    }
  }
}

// Wire a page: `container` gets the canvas; every element matching `buttonSelector` with
// data-key and data-src shows that model when clicked; the first one is shown at once.
export function start(container, { status = null, buttonSelector = "[data-splat-key]" } = {}) {
  const viewer = new Viewer(container, status);
  const buttons = Array.from(document.querySelectorAll(buttonSelector));
  const pick = (b) => {
    for (const other of buttons) other.classList.toggle("active", other === b);
    viewer.show(b.dataset.splatKey, b.dataset.splatSrc);
  };
  for (const b of buttons) {
    b.addEventListener("click", () => {
      pick(b);
      container.scrollIntoView({ block: "nearest" });
    });
  }
  if (buttons.length) pick(buttons[0]);
  return viewer;
}
