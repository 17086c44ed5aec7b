"""slimserve on Ray (`pip install slimserve[ray]`; docs/scale-out.md).

- `serve_app`: a Ray Serve application whose replicas each hold slimserve's models (each
  model's engine in its own supervised process, as in `slimserve serve`) and answer the
  OpenAI-compatible routes with the server's own HTTP door, behind Serve's HTTP ingress:
  `slimserve serve --ray ADDRESS ...`.
- `batch`: fraud scoring of a file across a Ray cluster, one engine per worker, writing the
  same output and audit columns as the single-machine scorer: `slimserve fraud score FILE
  --ray ADDRESS`.

This part joins the server, the engine, the clients and the fraud example, which may not
import one another, so it is a part of its own (docs/architecture.md). Nothing else imports
it but the CLI, and only when `--ray` is given: ray stays an optional dependency.
"""
