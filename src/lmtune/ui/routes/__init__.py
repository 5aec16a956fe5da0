"""The UI's API, one router per job: data (upload, inspect, clean), runs (estimate, start, stop, resume,
progress), chat (the Try page: answers, evaluation, reports), export (merge, GGUF) and files (downloads)."""
