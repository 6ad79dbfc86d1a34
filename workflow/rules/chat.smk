# Chat: chat_data -> chat_encode -> chat_train -> chat_export -> gguf_convert -> quantize, beside the base model
#
#   snakemake --cores 4 exports/tinygpt-chat/model-q4_k_m.gguf
#
# The chat model is the trained base model (checkpoints/best.pt) fine-tuned on conversations in ChatML, with the
# loss on the assistant's turns only, by the same training loop; its files go to exports/tinygpt-chat/. The rules
# after training are the base model's, reused with other paths (`use rule ... with`).

CHAT = config["chat"]
CHAT_EXPORT = "exports/tinygpt-chat"


rule chat_data:
    input:
        code=sources("chat_data"),
        files=local_files(CHAT),
    output:
        conversations="data/chat/conversations.jsonl",
    params:
        args=chat_data_flags(CHAT),
    log:
        "logs/chat_data.log",
    benchmark:
        "benchmarks/chat_data.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt chat_data {params.args} --out {output.conversations} 2>&1 | tee {log}"


rule chat_encode:
    input:
        conversations=rules.chat_data.output.conversations,
        tokenizer=rules.train_bpe.output.tokenizer,
        code=sources("chat_encode"),
    output:
        train="data/chat/tokens/train.bin",
        val="data/chat/tokens/val.bin",
        meta="data/chat/tokens/meta.json",
        # beside the tokens: the loss mask (1 on the assistant's tokens) and where each conversation starts
        masks=multiext("data/chat/tokens/", "train.mask.bin", "val.mask.bin", "train.starts.bin", "val.starts.bin"),
    params:
        args=flags({"block_size": CHAT["block_size"], "val_fraction": CHAT["val_fraction"]}),
    log:
        "logs/chat_encode.log",
    benchmark:
        "benchmarks/chat_encode.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt chat_encode --conversations {input.conversations} --tokenizer {input.tokenizer}"
        " --out_dir $(dirname {output.meta}) {params.args} 2>&1 | tee {log}"


use rule train as chat_train with:
    input:
        train=rules.chat_encode.output.train,
        val=rules.chat_encode.output.val,
        meta=rules.chat_encode.output.meta,
        tokenizer=rules.train_bpe.output.tokenizer,
        start=rules.train.output.checkpoint,
        code=sources("train"),
    output:
        checkpoint="checkpoints/chat/best.pt",
    params:
        launcher=train_launcher(config["train"]),
        args=chat_train_flags(config["model"], config["train"], CHAT, start=rules.train.output.checkpoint),
        runs="checkpoints/chat/runs",
    log:
        "logs/chat_train.log",
    benchmark:
        "benchmarks/chat_train.tsv"


rule chat_eval:
    input:
        # replies to requests and questions from seeds no training conversation came from, scored automatically
        checkpoint=rules.chat_train.output.checkpoint,
        code=sources("chat_eval"),
    output:
        json="reports/chat.json",
    params:
        args=flags({"count": CHAT["eval_prompts"]}),
    log:
        "logs/chat_eval.log",
    benchmark:
        "benchmarks/chat_eval.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt chat_eval --checkpoint {input.checkpoint} {params.args} --json {output.json} 2>&1 | tee {log}"


use rule export as chat_export with:
    input:
        checkpoint=rules.chat_train.output.checkpoint,
        code=sources("export"),
    output:
        files=[f"{CHAT_EXPORT}/{name}" for name in EXPORT_FILES + ["Modelfile"]],
        config=f"{CHAT_EXPORT}/config.json",
    log:
        "logs/chat_export.log",
    benchmark:
        "benchmarks/chat_export.tsv"


use rule gguf_convert as chat_gguf_convert with:
    input:
        files=rules.chat_export.output.files,
        config=rules.chat_export.output.config,
        code=sources("gguf_convert"),
    output:
        gguf=f"{CHAT_EXPORT}/model-{{outtype}}.gguf",
    params:
        args=flags({"name": f"{config['export']['name']}-chat"}),
    log:
        "logs/chat_gguf_convert-{outtype}.log",
    benchmark:
        "benchmarks/chat_gguf_convert-{outtype}.tsv"


use rule imatrix as chat_imatrix with:
    input:
        # calibrated on the chat training conversations, as they are rendered for the model
        gguf=f"{CHAT_EXPORT}/model-{config['quantize']['input']}.gguf",
        tokens=rules.chat_encode.output.train,
        code=sources("imatrix"),
    output:
        imatrix=f"{CHAT_EXPORT}/imatrix.gguf",
    log:
        "logs/chat_imatrix.log",
    benchmark:
        "benchmarks/chat_imatrix.tsv"


use rule quantize as chat_quantize with:
    input:
        gguf=f"{CHAT_EXPORT}/model-{config['quantize']['input']}.gguf",
        imatrix=rules.chat_imatrix.output.imatrix if config["quantize"]["imatrix"] else [],
        code=sources("quantize"),
    output:
        gguf=f"{CHAT_EXPORT}/model-{{qtype}}.gguf",
    log:
        "logs/chat_quantize-{qtype}.log",
    benchmark:
        "benchmarks/chat_quantize-{qtype}.tsv"
