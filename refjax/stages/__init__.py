"""How a run lives on disk: each stage reads artifacts, calls `refjax.method` and
`refjax.training`, and writes artifacts; `pipeline` orders them, `workdir` names every file."""
