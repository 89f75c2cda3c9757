// Validates custom resources (KEDA ScaledObject, Prometheus Operator ServiceMonitor/PrometheusRule,
// Gateway API HTTPRoute)
// against the OpenAPI schemas of their CRDs, as compiled into the kubernetes-models packages, and
// rejects fields those schemas do not declare (the compiled validators accept unknown fields, as a
// CRD does; a typo such as `minReplicas` would then be silently pruned by the API server). The
// declared fields are read from the packages' TypeScript declarations (.d.ts), which are generated
// from the same CRD schemas.
//
// Reads a JSON array of objects on stdin; prints a JSON array of {kind, name, errors} on stdout.
// Used by tests/deploy/test_kubernetes.py (kubernetes-validate knows only the core types).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { PodMonitor, PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";

const require = createRequire(import.meta.url);
const packageDir = (name) => dirname(require.resolve(`${name}/package.json`));
const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": [ScaledObject, join(packageDir("@kubernetes-models/keda"), "keda.sh/v1alpha1/ScaledObjectSpec.d.ts")],
  "monitoring.coreos.com/v1/ServiceMonitor": [ServiceMonitor, join(packageDir("@kubernetes-models/prometheus-operator"), "monitoring.coreos.com/v1/ServiceMonitorSpec.d.ts")],
  "monitoring.coreos.com/v1/PodMonitor": [PodMonitor, join(packageDir("@kubernetes-models/prometheus-operator"), "monitoring.coreos.com/v1/PodMonitorSpec.d.ts")],
  "monitoring.coreos.com/v1/PrometheusRule": [PrometheusRule, join(packageDir("@kubernetes-models/prometheus-operator"), "monitoring.coreos.com/v1/PrometheusRuleSpec.d.ts")],
  "gateway.networking.k8s.io/v1/HTTPRoute": [HTTPRoute, join(packageDir("@kubernetes-models/gateway-api"), "gateway.networking.k8s.io/v1/HTTPRouteSpec.d.ts")],
};

// ---- the declared shape of a .d.ts interface: {object: {key: shape}} | {array: shape} | {map: shape} | "leaf"
const shapes = new Map();

function interfaceShape(file) {
  if (shapes.has(file)) return shapes.get(file);
  const text = readFileSync(file, "utf8").replace(/\/\*\*[\s\S]*?\*\//g, "");
  const imports = new Map();
  for (const m of text.matchAll(/import \{ ([^}]+) \} from "([^"]+)";/g)) {
    for (const name of m[1].split(",").map((s) => s.trim())) imports.set(name, m[2]);
  }
  // The class declaration lists every field, inherited ones included (an interface may `extends`
  // another, e.g. HTTPRouteSpec's parentRefs come from CommonRouteSpec); the interface otherwise.
  const declared = text.search(/export declare class \w+ extends Model<\w+> implements [\w, ]+ \{/);
  const start = declared >= 0 ? declared : text.search(/export interface \w+ (extends [\w, ]+ )?\{/);
  const alias = /export type I\w+ = ([^;]+);/.exec(text); // e.g. `export type IDuration = string;`
  if (start < 0 && !alias) throw new Error(`no interface in ${file}`);
  const open = text.indexOf("{", start);
  const body = start < 0 ? alias[1] : text.slice(open, matching(text, open) + 1);
  const placeholder = { object: {} };
  shapes.set(file, placeholder); // recursive types
  const shape = parseType(body, { file, imports });
  if (typeof shape === "string") {
    shapes.set(file, shape);
    return shape;
  }
  Object.assign(placeholder, shape);
  return placeholder;
}

function matching(text, open) {
  let depth = 0;
  for (let i = open; i < text.length; i++) {
    if (text[i] === "{" || text[i] === "<") depth++;
    if (text[i] === "}" || text[i] === ">") depth--;
    if (depth === 0) return i;
  }
  throw new Error("unbalanced");
}

function parseType(type, ctx) {
  type = type.trim();
  if (type.startsWith("Array<") && matching(type, 5) === type.length - 1) return { array: parseType(type.slice(6, -1), ctx) };
  if (type.startsWith("{")) {
    const inner = type.slice(1, -1).trim();
    if (inner.startsWith("[key: string]:")) return { map: parseType(inner.slice(14).replace(/;\s*$/, ""), ctx) };
    const object = {};
    let i = 0;
    while (i < inner.length) {
      const m = /^\s*"([^"]+)"\??:\s*/.exec(inner.slice(i));
      if (!m) break;
      i += m[0].length;
      let j = i, depth = 0;
      for (; j < inner.length; j++) {
        const c = inner[j];
        if (c === "{" || c === "<") depth++;
        if (c === "}" || c === ">") depth--;
        if (c === ";" && depth === 0) break;
      }
      object[m[1]] = parseType(inner.slice(i, j), ctx);
      i = j + 1;
    }
    return { object };
  }
  const source = ctx.imports.get(type);
  if (source && source.startsWith("./")) return interfaceShape(join(dirname(ctx.file), source.replace(/\.js$/, ".d.ts")));
  return "leaf"; // primitives, unions, and core Kubernetes types (ObjectMeta, LabelSelector): not walked
}

function unknownFields(value, shape, path, out) {
  if (shape === "leaf" || value === null || typeof value !== "object") return out;
  if (shape.array && Array.isArray(value)) value.forEach((v, i) => unknownFields(v, shape.array, `${path}/${i}`, out));
  else if (shape.map) for (const [k, v] of Object.entries(value)) unknownFields(v, shape.map, `${path}/${k}`, out);
  else if (shape.object && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) {
      if (!(k in shape.object)) out.push(`${path}/${k} is not a field of the CRD schema`);
      else unknownFields(v, shape.object[k], `${path}/${k}`, out);
    }
  }
  return out;
}

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = [];
for (const object of JSON.parse(input)) {
  const key = `${object.apiVersion}/${object.kind}`;
  const name = object.metadata?.name ?? "";
  if (!MODELS[key]) {
    results.push({ kind: key, name, errors: [`no schema for ${key}`] });
    continue;
  }
  const [Model, specDeclaration] = MODELS[key];
  const errors = [];
  try {
    new Model(object).validate();
  } catch (error) {
    const details = error.errors?.map((e) => `${e.instancePath || "/"} ${e.message} ${JSON.stringify(e.params ?? {})}`);
    errors.push(...(details?.length ? details : [String(error)]));
  }
  for (const field of Object.keys(object)) {
    if (!["apiVersion", "kind", "metadata", "spec"].includes(field)) errors.push(`/${field} is not expected`);
  }
  unknownFields(object.spec ?? {}, interfaceShape(specDeclaration), "/spec", errors);
  results.push({ kind: key, name, errors });
}
process.stdout.write(JSON.stringify(results));
