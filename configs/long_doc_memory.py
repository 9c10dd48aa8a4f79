"""configs/long_doc.py with Transformer-XL memory and a Longformer pattern (issue 39): RoPE positions,
each causal layer also attends to the previous 128 positions of its document (memory_length), within a
window of 128 plus each document's first 16 tokens (attention_pattern). Training reads the chapters as
row streams (row i of a batch continues row i of the one before); eval.py prints strided perplexity and
perplexity with memory 0, 128, 256 and 512 over the whole held-out chapters.

    python train.py --config=configs/long_doc_memory.py --workdir=runs/long_doc_memory
    python eval.py --config=configs/long_doc_memory.py --workdir=runs/long_doc_memory
"""

from configs import long_doc


def get_config():
    c = long_doc.get_config()
    c.model.overrides.position = "rope"  # memory needs positions relative to the segment
    c.model.overrides.memory_length = 128
    c.model.overrides.attention_pattern = "longformer"
    c.model.overrides.pattern_window = 128
    c.model.overrides.global_tokens = 16
    c.long_document_memory = "0,128,256,512"
    return c
