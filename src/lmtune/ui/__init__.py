"""`lmtune ui`: the whole job (data, training, trying, export) in a local web page, in Vietnamese and English.

Why FastAPI and a plain HTML page rather than Gradio, which LLaMA-Factory's LlamaBoard and most of the field use:
FastAPI and uvicorn are already dependencies (`lmtune serve`), so the UI costs no new install, while Gradio
would add a large dependency tree (its own web server, pandas, a frontend bundle) and a version churn that
breaks apps between minor releases. The page is one HTML file and one script with no build step (no npm); the
loss plot and the token-length histogram are small inline SVGs. What Gradio would give for free (widgets,
streaming, queues) is a few dozen lines here: streaming is newline-delimited JSON read with `fetch`, and the
only long jobs (training, evaluation, export) are background work the page polls. Every text is in both
languages in `texts.py`, which Gradio's i18n would also need.

The UI sits above every stage, like `cli.py`: it calls the library's functions and adds no training,
generation or scoring of its own (`app.py` lists which function each action calls). Training is an
`lmtune train` subprocess (`training.py` says why).
"""
