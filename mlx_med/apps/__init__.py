"""Medical LLM applications on one client interface (local model, `mlx-med serve`, any OpenAI-compatible endpoint).

The Perspective framework's three steps map onto the modules:

* modeling -- break a clinical workflow into steps: `dag` (a small DAG of LLM and tool steps run
  concurrently), `prompts` (templates with named, composable parts);
* optimization -- prompts, external knowledge, tools: `structured` (pydantic-validated output with
  retries, grammar-constrained when the backend supports `response_format`), `retrieval` (BM25,
  dense through /v1/embeddings, reciprocal rank fusion), `tools` (OpenAI tools format), `metascale`
  (test-time scaling with meta-thoughts);
* system engineering -- subtasks and human expertise: `uma` (UniMedAbstractor: one template, one
  attribute per config entry, retrieval, per-note extraction, aggregation), `review` (a SQLite
  human-review queue), `calllog` (every call logged: hash, model, tokens, latency, cost).

`oncology` generates the synthetic records, `train` the small embedded model, `clients` the
command-line model choice, `demo` runs it all (`make apps-demo`).
"""
