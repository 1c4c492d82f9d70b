"""Other libraries' formats, in and out:

- `gguf_export.py`: a checkpoint as a GGUF file (llama.cpp, ollama).
"""
