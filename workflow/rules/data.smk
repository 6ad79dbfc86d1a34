# Data: download -> clean -> train_bpe -> encode


# Fetching runs where Snakemake runs (on a cluster: the login node), since compute nodes often have no internet.
localrules:
    download,


rule download:
    input:
        code=sources("download"),
        files=local_files(config["download"]),
    output:
        text=f"data/raw/{config['download']['source']}.txt",
    params:
        args=download_flags(config["download"]),
    log:
        "logs/download.log",
    benchmark:
        "benchmarks/download.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt download {params.args} --out {output.text} 2>&1 | tee {log}"


rule clean:
    input:
        text=rules.download.output.text,
        code=sources("clean"),
    output:
        corpus="data/clean/corpus.txt",
        stats="data/clean/corpus.stats.json",
    params:
        args=flags(config["clean"]),
    log:
        "logs/clean.log",
    benchmark:
        "benchmarks/clean.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt clean --input {input.text} --out {output.corpus} --stats {output.stats}"
        " {params.args} 2>&1 | tee {log}"


# The tokenizer is learned from the corpus, or, with train.init_from a model, taken from that model: then the model's
# files are the inputs and model_tokenizer the command (scratch's inputs and command are what they always were).
FROM_MODEL = bool(start_files(config["train"]))
TOKENIZER_SOURCE = (
    {"start": start_files(config["train"]), "code": sources("model_tokenizer")}
    if FROM_MODEL
    else {"corpus": rules.clean.output.corpus, "code": sources("train_bpe")}
)


rule train_bpe:
    input:
        **TOKENIZER_SOURCE,
    output:
        tokenizer="data/tokenizer/tokenizer.json",
    params:
        args=flags({"model": config["train"]["init_from"]}) if FROM_MODEL else flags(config["train_bpe"]),
    log:
        "logs/train_bpe.log",
    benchmark:
        "benchmarks/train_bpe.tsv"
    threads: 1 if FROM_MODEL else 4
    conda:
        "../envs/tinygpt.yaml"
    shell:
        (
            "python -m tinygpt model_tokenizer {params.args} --out {output.tokenizer} 2>&1 | tee {log}"
            if FROM_MODEL
            else (
                "python -m tinygpt train_bpe --corpus {input.corpus} --out {output.tokenizer} {params.args}"
                " --threads {threads} 2>&1 | tee {log}"
            )
        )


rule encode:
    input:
        corpus=rules.clean.output.corpus,
        tokenizer=rules.train_bpe.output.tokenizer,
        code=sources("encode"),
    output:
        train="data/tokens/train.bin",
        val="data/tokens/val.bin",
        meta="data/tokens/meta.json",
    params:
        args=flags(config["encode"]),
    log:
        "logs/encode.log",
    benchmark:
        "benchmarks/encode.tsv"
    threads: 4
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt encode --corpus {input.corpus} --tokenizer {input.tokenizer}"
        " --out_dir $(dirname {output.meta}) {params.args} --threads {threads} 2>&1 | tee {log}"
