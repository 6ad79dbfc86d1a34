#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity, llama-server,
# llama-cli, llama-tokenize) from the llama.cpp sources vendored in the llama-cpp-python sdist, the same
# version the Python bindings are built from. Tests find them on PATH or in $LLAMA_CPP_BIN.
#
#   tools/build_llama_tools.sh [PREFIX]      # default PREFIX: ~/.cache/tinygpt/llama.cpp; binaries in PREFIX/bin
#
# GGML_NATIVE=OFF: see docs/gguf.md#build-flags. Takes about 10 minutes on 2 cores; an existing build is kept.
set -euo pipefail
prefix="${1:-${HOME}/.cache/tinygpt/llama.cpp}"
version="${LLAMA_CPP_PYTHON_VERSION:-$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || echo 0.3.36)}"
tools=(llama-quantize llama-imatrix llama-perplexity llama-server llama-cli llama-tokenize)

if [[ -f "${prefix}/bin/.version" && "$(cat "${prefix}/bin/.version")" == "${version}" ]]; then
    echo "llama.cpp tools ${version} already in ${prefix}/bin"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==${version}" -d "${work}"
tar xzf "${work}"/llama_cpp_python-*.tar.gz -C "${work}"
src="$(echo "${work}"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "${src}" -B "${work}/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF > "${work}/cmake.log"
cmake --build "${work}/build" -j "$(nproc)" --target "${tools[@]}" > "${work}/build.log"
mkdir -p "${prefix}/bin"
for tool in "${tools[@]}"; do
    cp "${work}/build/bin/${tool}" "${prefix}/bin/"
done
echo "${version}" > "${prefix}/bin/.version"
echo "llama.cpp tools ${version} in ${prefix}/bin"
