"""Reserved token ids, shared by the tokenizer, the models' data and decoding (no heavy imports).

They follow the Flax examples: 0 = padding (also the decoder's start token after `shift_right`),
1 = end of sentence, 2 = unknown, no BOS; 3 is "<mask>" for masked language modelling.
"""

PAD_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3
