"""GGUF files of a merge, for llama.cpp and the tools built on it: written from the merged safetensors, one
tensor at a time, with the tokenizer and chat template in the metadata. Uses the gguf package, numpy and the
merge's files; never torch, the merge engine or the Hub."""
