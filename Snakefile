# tinygpt: raw text to a quantized GGUF, one rule per stage. Read top to bottom:
#
#   download -> clean -> train_bpe -> encode -> train -> export -> gguf_convert -> quantize
#                                                    \-> chat_train (on chat_data -> chat_encode) -> chat_export -> ...
#
#   snakemake --cores 4 exports/tinygpt/model-q4_k_m.gguf       # the base model: everything missing or stale
#   snakemake --cores 4 exports/tinygpt-chat/model-q4_k_m.gguf  # the chat model (and the base it starts from)
#   snakemake --cores 4 -n                                    # what would run, and why
#
# Settings live in config.yaml; workflow/schemas/config.schema.yaml lists every key, its range and default.

import sys

from snakemake.utils import min_version

from tinygpt.common import TinyGPTError
from tinygpt.config import check_config, load_schema

min_version("8.0")


configfile: "config.yaml"


# A typo, a wrong type or an out-of-range value stops here, naming the key, before any job runs.
try:
    config.update(check_config(config, load_schema(f"{workflow.basedir}/workflow/schemas/config.schema.yaml")))
except TinyGPTError as error:
    sys.exit(f"error: {error}")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/gguf.smk"
include: "workflow/rules/chat.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "exports/tinygpt/model-q4_k_m.gguf",
        "exports/tinygpt-chat/model-q4_k_m.gguf",
        rules.samples.output,
        rules.report.output,
