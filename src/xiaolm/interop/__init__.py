"""Other libraries' formats, in and out (`pip install 'xiaolm[hf]'` for transformers' side):

- `hf_config.py`: which transformers architecture computes what a xiaolm model computes (Llama,
  Qwen2, Qwen3, Mixtral, Qwen3-MoE) and back, config.json field by field, weight names, refusals;
- `hf_export.py`: a checkpoint as a transformers folder, and LoRA adapters renamed for peft;
- `hf_import.py`: a transformers folder as a xiaolm model, weights streamed tensor by tensor;
- `gguf_export.py`: a checkpoint as a GGUF file (llama.cpp, ollama), `pip install 'xiaolm[gguf]'`.

`checkpoint.load_model` detects the format of what it is given (`checkpoint.detect_format`), so
every command that takes a checkpoint takes a transformers folder too.
"""
