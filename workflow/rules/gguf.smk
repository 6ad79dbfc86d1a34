# GGUF: export -> gguf_convert -> (imatrix) -> quantize

EXPORT_FILES = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


wildcard_constraints:
    outtype="f16|f32|bf16",
    qtype="q4_k_m|q5_k_m|q6_k|q8_0|q5_0|q4_0",


rule export:
    input:
        checkpoint=rules.train.output.checkpoint,
        code=sources("export"),
    output:
        files=[f"exports/tinygpt/{name}" for name in EXPORT_FILES],
        config="exports/tinygpt/config.json",
    log:
        "logs/export.log",
    benchmark:
        "benchmarks/export.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt export --checkpoint {input.checkpoint} --out_dir $(dirname {output.config})"
        " 2>&1 | tee {log}"


rule gguf_convert:
    input:
        files=rules.export.output.files,
        config=rules.export.output.config,
        code=sources("gguf_convert"),
    output:
        gguf="exports/tinygpt/model-{outtype}.gguf",
    params:
        args=flags({"name": config["export"]["name"]}),
    log:
        "logs/gguf_convert-{outtype}.log",
    benchmark:
        "benchmarks/gguf_convert-{outtype}.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt gguf_convert --model_dir $(dirname {input.config}) --out {output.gguf}"
        " --outtype {wildcards.outtype} {params.args} 2>&1 | tee {log}"


rule imatrix:
    input:
        # the float file the quantizer reads, run over training tokens (never validation): reruns only when the
        # model or the calibration text (or this stage's code) changes
        gguf=f"exports/tinygpt/model-{config['quantize']['input']}.gguf",
        tokens=rules.encode.output.train,
        code=sources("imatrix"),
    output:
        imatrix="exports/tinygpt/imatrix.gguf",
    params:
        args=flags({"chunks": config["quantize"]["imatrix_chunks"]}),
    log:
        "logs/imatrix.log",
    benchmark:
        "benchmarks/imatrix.tsv"
    threads: config["quantize"]["threads"]
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt imatrix --gguf {input.gguf} --tokens {input.tokens} --out {output.imatrix}"
        " {params.args} --threads {threads} 2>&1 | tee {log}"


rule quantize:
    input:
        gguf=f"exports/tinygpt/model-{config['quantize']['input']}.gguf",
        imatrix=rules.imatrix.output.imatrix if config["quantize"]["imatrix"] else [],
        code=sources("quantize"),
    output:
        gguf="exports/tinygpt/model-{qtype}.gguf",
    params:
        args=flags({"pure": config["quantize"]["pure"]}),
        imatrix=lambda wildcards, input: f"--imatrix {input.imatrix}" if input.imatrix else "",
    log:
        "logs/quantize-{qtype}.log",
    benchmark:
        "benchmarks/quantize-{qtype}.tsv"
    threads: config["quantize"]["threads"]
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt quantize --input {input.gguf} --out {output.gguf} --type {wildcards.qtype}"
        " {params.args} {params.imatrix} --threads {threads} 2>&1 | tee {log}"


rule kl_divergence:
    input:
        # how far a quantized file's predictions drift from the float file, on the validation tokens
        gguf="exports/tinygpt/model-{qtype}.gguf",
        reference=rules.quantize.input.gguf,
        val=rules.encode.output.val,
        code=sources("evaluate"),
    output:
        json="reports/kl/model-{qtype}.json",
    log:
        "logs/kl_divergence-{qtype}.log",
    benchmark:
        "benchmarks/kl_divergence-{qtype}.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt evaluate --gguf {input.gguf} --reference {input.reference} --tokens {input.val}"
        " --device cpu --json {output.json} 2>&1 | tee {log}"
