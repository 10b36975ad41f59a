// Copies ONNX Runtime Web's WebAssembly build from node_modules into signflow/_web/ (package data,
// git-ignored), which `signflow serve` serves at /ort/: the page never fetches it from a CDN.
// Run by `npm ci --prefix web` (postinstall). The names must match signflow/serve.py's ORT_WEB_FILES.
import { copyFileSync, mkdirSync, renameSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "node_modules", "onnxruntime-web", "dist");
const target = join(here, "..", "signflow", "_web");
const names = ["ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"];
mkdirSync(target, { recursive: true });
for (const name of names) {
  copyFileSync(join(dist, name), join(target, `${name}.tmp`));
  renameSync(join(target, `${name}.tmp`), join(target, name));  // atomic: serve never sees half a file
}
console.log(`copied ${names.join(", ")} into ${target}`);
