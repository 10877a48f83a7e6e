# The OpenSeq2Seq config of seed 001: the en-de Transformer example with the edits the seed made.
#
# The seed copied example_configs/text2text/en-de/transformer-base.py to /data and edited it by
# hand. This file loads that example from the image and applies the same edits, so the example
# itself stays as upstream wrote it:
# - data_root: the WMT16 en-de data that scripts/get_en_de.sh prepared, on the shared storage
#   ($WMT16_DE_EN, default /data/wmt16_de_en/);
# - mixed precision ("dtype": "mixed", "loss_scaling": "Backoff") with batch_size_per_gpu 256,
#   as the example advises for V100s;
# - "repeat": True for the evaluation data;
# - max_steps 50,000, where the seed stopped instead of the example's 300,000.
# logdir, max_steps and load_model are also given on the command line (OpenSeq2Seq lets any
# top-level base_params value be overridden with --name=value), where trainrig fills them in.
#
# It runs inside the image with the Python 3.5 of NGC TensorFlow 19.05: no f-strings.
import os
import runpy

EXAMPLE = "/opt/OpenSeq2Seq/example_configs/text2text/en-de/transformer-base.py"
DATA_FILES = ("src_vocab_file", "tgt_vocab_file", "source_file", "target_file")

_example = runpy.run_path(EXAMPLE)
data_root = os.path.join(os.environ.get("WMT16_DE_EN", "/data/wmt16_de_en"), "")


def _rebased(params):
    """The section with its data files under data_root instead of the example's placeholder."""
    layer = dict(params["data_layer_params"])
    for key in DATA_FILES:
        layer[key] = data_root + layer[key][len(_example["data_root"]) :]
    return dict(params, data_layer_params=layer)


base_model = _example["base_model"]
base_params = dict(
    _example["base_params"],
    batch_size_per_gpu=256,
    dtype="mixed",
    loss_scaling="Backoff",
    max_steps=50000,
    # A checkpoint directory to start from (an earlier run's logdir or its best_models); empty: none.
    load_model="",
)
train_params = _rebased(_example["train_params"])
eval_params = _rebased(_example["eval_params"])
eval_params["data_layer_params"]["repeat"] = True
infer_params = _rebased(_example["infer_params"])
