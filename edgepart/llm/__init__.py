"""The model: a decoder's shapes, its blocks and their costs, its weights, and torch execution.

A decoder-only transformer is cut into blocks (the embedding, one KV group of attention
heads per layer with its key and value cache, the output projection, the FFN and the LM
head); the other packages place, run and move these blocks. Nothing here knows about
devices, MQTT or placements beyond a mapping of blocks to holders.

Shapes and costs:

model: ``ModelSpec``, the shapes of a decoder, from presets or explicit values.
arch: how a decoder computes beyond its shapes (norms, positions, activation, biases).
blocks: the block decomposition (``BlockTable``) and each block's analytic cost per step.
calibration: measured block speeds turned into the FLOPs the cost model charges.
host_profile: this host's compute profile, measured on first use and cached.

Weights and tokenizer:

files: where a model's weights and tokenizer live (preset name, .gguf file, HF directory).
loader: ``open_model``: a model argument opened for execution.
tensors: ``TensorSource``: named tensors read lazily, one slice at a time.
gguf_meta: GGUF metadata as plain values, and the ``ModelSpec`` it describes.
gguf_source: GGUF checkpoints as a ``TensorSource`` (Hugging Face names and layouts).
hf_config: a Hugging Face ``config.json`` read into a ``ModelSpec``.
safetensors_source: a Hugging Face safetensors directory as a ``TensorSource``.
weight_cache: a per-block cache of dequantised weights (one file read per block).
tokenizer: the tokenizer of a model file (GGUF metadata or ``tokenizer.json``), no hub.

Execution:

torch_blocks: torch execution of one block each.
state: the serialised state of a movable block (KV group, projection, FFN), for migration.
runtime: block-wise execution over a placement in one process: the reference runtime.

Imports: the standard library and third-party packages (torch, numpy, gguf, tokenizers),
none of edgepart's other packages. The packages depend one way (docs/design.md):
``llm`` <- ``device_agent`` <- ``controller`` <- ``emulator``, with ``control_plane``
below ``device_agent`` and ``controller``.
"""
