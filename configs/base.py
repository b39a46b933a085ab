"""Every jaxsft knob, documented once. Run configs import this and override what they need.

python -m jaxsft.main --config configs/RUN.py --config.train.learning_rate=1e-4
"""

import ml_collections


def group() -> ml_collections.ConfigDict:
    # Not type-safe: data.train takes a path or a list of {path, weight}; jaxsft.config checks
    # every value against the type of its default here.
    return ml_collections.ConfigDict(type_safe=False)


def get_config() -> ml_collections.ConfigDict:
    c = group()
    # Everything the run writes goes here: config.json, data_report.json, metrics.jsonl,
    # checkpoints/, hf/, adapter/, tensorboard/, loss.png. Re-running with the same run_dir resumes.
    c.run_dir = "runs/default"

    c.model = group()
    # Local HF checkpoint directory: config.json, *.safetensors (+ index), tokenizer files.
    c.model.path = ""
    # Compute dtype of activations and matmuls; logits and the loss are always float32.
    c.model.dtype = "bfloat16"
    # Master-weight dtype (optimizer updates happen in this dtype).
    c.model.param_dtype = "float32"
    # Rematerialisation per layer: "none" (keep all activations), "full" (recompute the layer),
    # "dots" (save matmul outputs without batch dims, recompute the rest).
    c.model.remat = "none"
    # Layers per iteration of the scan over layers: 1 keeps compile time independent of depth;
    # unrolling (e.g. all layers) lets XLA:CPU run the backward ~20% faster on small models.
    c.model.unroll_layers = 1
    # Attention kernel: "auto" (splash on TPU, cudnn's choice on GPU, xla elsewhere), "xla" (einsum,
    # dense mask), "cudnn" (jax.nn.dot_product_attention, dense mask), "pallas_gpu" (Pallas
    # Triton flash kernel with segment ids; no window or softcap: those fall back to the dense
    # path), "splash" (TPU splash attention: segment ids, windows, softcap). docs/performance.md
    c.model.attention = "auto"
    # QLoRA (LoRA runs only): store the frozen base's attention, MLP and expert kernels
    # quantised, "int8" (per-output-channel absmax scales) or "nf4" (4-bit NormalFloat, absmax
    # scales per block of 64 inputs, two codes a byte); dequantised inside each matmul. "" or
    # "none": off. Embeddings, LM head, norms and MoE routers stay in param_dtype; the exports
    # re-read the full-precision base from model.path. docs/training.md, "QLoRA"
    c.model.quantize = ""

    c.data = group()
    # A file or directory (JSONL, JSON, Parquet, saved `datasets` dataset), or a list of
    # {"path": ..., "weight": ...} dicts for weighted mixing (weights are relative shares).
    c.data.train = ""
    # Length of an epoch of a weighted mixture: "sum" has as many examples as all sources
    # together (a source whose share is larger than itself is repeated); "first" ends when the
    # first source is used up at its share (no example repeats within an epoch).
    c.data.mix_epoch = "sum"
    # Same forms as data.train; "" means no eval set.
    c.data.eval = ""
    # Tokens per row; longer examples are truncated keeping the start.
    c.data.max_length = 2048
    # Pack several examples per row (best-fit-decreasing, segment-isolated attention).
    c.data.packing = True
    # "error": an invalid row stops the start naming file and line; "skip": drop and report it.
    c.data.on_invalid = "error"
    # When the chat template silently leaves out something a row has: "auto" refuses the row
    # for dropped tools or tool calls (the model would learn the wrong thing) and warns for
    # dropped reasoning or content beside calls; "error", "warn" or "allow" for all of them.
    # A refused row follows data.on_invalid.
    c.data.on_drop = "auto"
    # "all": one example per conversation, every assistant turn supervised; "expand": one
    # example per assistant turn (the conversation up to it, only it supervised, rendered as
    # the model sees it when it generates that turn: what Qwen3-style templates that drop
    # earlier reasoning need); "last": only the final assistant turn supervised.
    c.data.turns = "all"
    # Number of rendered examples `python -m jaxsft.data check --show` prints by default.
    c.data.show = 0
    # Where the rendered splits are cached (docs/data.md "Cache"): "" means <run_dir>/data_cache,
    # written once the start succeeded; any other directory (a shared one for a pod, filled
    # beforehand by `python -m jaxsft.data prepare`) is written as soon as rendering ends. A
    # later start, another host or `jaxsft.data check` with the same data files (by content),
    # tokenizer, template, data.max_length, data.on_invalid/on_drop/turns and data.train/eval
    # loads it instead of rendering.
    c.data.cache_dir = ""
    # Processes that render (each loads the tokenizer once): 0 means one per core, 1 renders in
    # this process. The result is identical for any number.
    c.data.workers = 0

    c.train = group()
    # Run length in optimizer steps; 0 means derive it from num_epochs (steps win when both set).
    c.train.max_steps = 0
    c.train.num_epochs = 1.0
    # Global rows per optimizer step (all hosts, all micro-batches) and micro-batches per step.
    c.train.batch_size = 8
    c.train.grad_accum = 1
    # Peak learning rate, linear warmup share of the run, cosine decay to peak * end_lr_ratio.
    c.train.learning_rate = 2e-5
    c.train.warmup_ratio = 0.03
    c.train.end_lr_ratio = 0.1
    # AdamW: decoupled weight decay (applied to every kernel and to the embedding table, not to
    # norm scales or biases), betas, eps.
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    # Global-norm gradient clipping; 0 disables it.
    c.train.max_grad_norm = 1.0
    c.train.seed = 0
    # Tokens per chunk of the chunked cross-entropy (bounds the [tokens x vocab] logits buffer).
    c.train.loss_chunk = 2048
    # Beta of KL(fine-tuned || base) on supervised tokens; 0 disables it.
    c.train.kl_to_base = 0.0
    # MoE models: weight of the load-balancing loss (transformers' router_aux_loss_coef);
    # < 0 takes the checkpoint's own config.json value, 0 turns it off. Logged as
    # router_aux_loss with the expert load (expert_load_max / expert_load_min: the busiest and
    # idlest expert's tokens over the mean).
    c.train.router_aux_loss_coef = -1.0
    # With train.grad_accum > 1: the balance loss's gradient uses the load fractions of the
    # whole global batch, as one big batch would (a routing-only forward pass over the
    # micro-batches first, about a third of a step more); False: each micro-batch's own.
    c.train.router_aux_global_batch = True
    # Intervals in optimizer steps; 0 disables eval/saving except at the end of the run.
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.save_every = 0
    # Stop this invocation after N more steps, saving a checkpoint (0: run to the end). Rerunning
    # the same command resumes; for time-sliced jobs.
    c.train.stop_after = 0
    # Peak FLOP/s per device in TFLOP/s for MFU; 0 picks a table value for the platform.
    c.train.peak_tflops = 0.0
    # Checkpoints to keep.
    c.train.keep_checkpoints = 2
    # Evaluate held-out loss (and the eval.* evals) before the first step.
    c.train.eval_at_start = True
    # Numerical guard: a step whose loss or gradients are not finite is skipped (parameters and
    # optimizer state unchanged) and counted; after this many consecutive skipped steps, or this
    # many consecutive logged losses above divergence_factor x their running median, the run
    # stops (exit 3) without saving, keeping the last good checkpoint. divergence_factor 0
    # disables the divergence check.
    c.train.max_bad_steps = 3
    c.train.divergence_factor = 3.0
    # Resuming with a changed key that alters the training trajectory (data, batch, schedule,
    # optimizer, LoRA, model, seed, max_length, packing) is refused unless this is True; every
    # change is recorded in run_dir/config_history.jsonl with the step it took effect.
    c.train.allow_config_change = False

    c.lora = group()
    # Rank 0 means full fine-tuning.
    c.lora.rank = 0
    c.lora.alpha = 16.0
    # Modules that get adapters (names of the HF linear layers). Fused names stand for their
    # parts (Phi's qkv_proj, gate_up_proj). MoE models: gate_proj/up_proj/down_proj adapt the
    # routed experts, one adapter per expert (Mixtral's w1/w3/w2 are the same three), and in
    # Qwen2-MoE the shared expert's projections too, as PEFT matched the checkpoint's module
    # names; the router never gets an adapter (see train_router).
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # rsLoRA scales by alpha / sqrt(rank) instead of alpha / rank.
    c.lora.rslora = False
    # MoE models: the routers (mlp.gate, [D, E] per layer) train with full weights in a LoRA
    # run (optimizer state, checkpoints, merged export; PEFT export as modules_to_save). No
    # effect on dense models or full fine-tuning (which trains the routers anyway).
    c.lora.train_router = False

    c.mesh = group()
    # Mesh shape over all devices of all hosts; -1 takes the remaining devices.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    # MoE models: experts split over this many devices, tokens sent to their experts' devices
    # (all_to_all); outside the MoE layers it is one more batch axis. Must divide num_experts.
    c.mesh.expert = 1

    c.eval = group()
    # Each eval is one file ("" for none), read and validated at start, scored before training
    # (train.eval_at_start), every train.eval_every steps and after training; its headline
    # metrics go to metrics.jsonl and summary.json as NAME_METRIC, its rows after training to
    # run_dir/NAME_after.json. Formats: docs/evaluation.md.
    # Golden set (JSONL with messages + expected), scored by generation: golden_score; rows with
    # "expected": null (or "label": "abstain") add golden_abstention_rate and
    # golden_false_abstention_rate.
    c.eval.golden = ""
    # Multiple-choice regression file (question, choices, answer), scored by log-likelihood:
    # mc_accuracy, and calibration of the choice probabilities: mc_ece (10 bins), mc_brier.
    c.eval.mc = ""
    # IFEval prompts (the public JSONL: key, prompt, instruction_id_list, kwargs), generated and
    # checked: ifeval_prompt_strict, ifeval_instruction_strict, ifeval_prompt_loose,
    # ifeval_instruction_loose. Its replies get eval.ifeval_max_new_tokens (512) new tokens.
    c.eval.ifeval = ""
    # Safety prompts (AdvBench goal,target CSV; XSTest prompt,type,label CSV; or JSONL
    # {prompt, label: safe|unsafe}), judged by a refusal string matcher (a lower bound):
    # safety_refusal_rate on unsafe prompts, safety_over_refusal_rate on safe ones.
    c.eval.safety = ""
    # Optional local judge model for safety (an HF checkpoint directory, "" for none): asked,
    # through its own chat template, for a one-word verdict (REFUSED or COMPLIED) per reply;
    # its verdicts then decide safety_refusal_rate / safety_over_refusal_rate (the matcher's
    # rates stay in safety_after.json). Loaded once per process, in model.dtype.
    c.eval.judge = ""
    # New tokens per generated reply, greedy: eval.max_new_tokens unless the eval's own
    # eval.NAME_max_new_tokens is > 0 (golden, ifeval, safety; judge for the judge's verdict).
    # IFEval's instructions (word counts, paragraphs, sections) need long replies.
    c.eval.max_new_tokens = 64
    c.eval.golden_max_new_tokens = 0
    c.eval.ifeval_max_new_tokens = 512
    c.eval.safety_max_new_tokens = 0
    c.eval.judge_max_new_tokens = 16
    # > 0: the first N rows of each eval file only.
    c.eval.max_rows = 0
    # Regression guard: when a general-capability metric (mc_accuracy, ifeval_prompt_strict,
    # ifeval_instruction_strict) falls by more than this from before to after training, the
    # summary's first line and report.md say so (advice: the exit code stays 0). 0 disables it.
    c.eval.max_regression = 0.05
    # True: a run whose regression guard fired exits 5 (after writing summary.json, report.md
    # and the export), so a pipeline can stop on it (docs/reliability.md).
    c.eval.fail_on_regression = False

    c.export = group()
    # "merged", "peft" (LoRA runs), "both" or "none"; written when training ends.
    c.export.format = "merged"
    # "source" keeps the source checkpoint's dtype; "bfloat16" / "float32" force one.
    c.export.dtype = "source"
    # Shard size above which the merged safetensors are split (bytes).
    c.export.max_shard_bytes = 5 * 1024**3
    return c
