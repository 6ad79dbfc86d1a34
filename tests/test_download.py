import hashlib
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tinygpt.common import TinyGPTError, run_cli
from tinygpt.data.download import SEPARATOR, _part_path, document_prefix, download, main, parse_size
from tinygpt.data.stories.generator import EOT

FAST = dict(timeout=5.0, retries=3, backoff=0.0)
BODY = "".join(f"Story number {i}. " * (i % 7 + 1) + f"\n{EOT}\n" for i in range(300)).encode()


class Server:
    """An HTTP server on 127.0.0.1 whose routes misbehave on purpose, one scripted behaviour per request.

    A route is (body, [behaviour, ...]); each request uses the next behaviour, the last one repeats:
      "ok" (honours Range), "full" (ignores Range), "drop" (sends half the body then hangs up),
      an int (that HTTP status), "slow" (answers after 2 s).
    """

    def __init__(self):
        self.routes: dict[str, tuple[bytes, list]] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path not in server.routes:
                    return self.send_error(404)
                body, script = server.routes[self.path]
                behaviour = script.pop(0) if len(script) > 1 else script[0]
                if isinstance(behaviour, int):
                    self.send_response(behaviour)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if behaviour == "slow":
                    time.sleep(2)
                start, end = 0, len(body) - 1
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if match and behaviour != "full":
                    start = int(match.group(1))
                    end = min(int(match.group(2) or end), len(body) - 1)
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start : end + 1]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if behaviour == "drop":
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def route(self, path: str, body: bytes, *script) -> str:
        self.routes[path] = (body, list(script) or ["ok"])
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("text, expected", [("tiny", 5_000_000), ("small", 50_000_000), ("medium", 200_000_000),
                                            ("12345", 12345), ("20MB", 20_000_000), ("1.5k", 1500), ("full", None),
                                            (None, None), (7, 7)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(TinyGPTError, match="--size 'huge'"):
        parse_size("huge")


def test_document_prefix_keeps_whole_documents_only():
    data = b"a\n" + SEPARATOR + b"bb\n" + SEPARATOR
    assert document_prefix(data, len(data)) == data
    assert document_prefix(data, len(data) - 1) == b"a\n" + SEPARATOR
    assert document_prefix(data, 3) == b""


# --------------------------------------------------------------------------------------------- builtin


def test_builtin_is_deterministic_capped_and_in_corpus_format(tmp_path):
    a = download("builtin", tmp_path / "a.txt", size=60_000, seed=1)
    b = download("builtin", tmp_path / "b.txt", size=60_000, seed=1)
    c = download("builtin", tmp_path / "c.txt", size=60_000, seed=2)
    data = a.read_bytes()
    assert data == b.read_bytes() != c.read_bytes()
    assert 50_000 < len(data) <= 60_000 and data.endswith(SEPARATOR)
    assert data.startswith(b"Once") or data[:1].isupper()
    assert download("builtin", tmp_path / "d.txt", size=200_000, seed=1).read_bytes().startswith(data)


def test_builtin_cli_writes_the_file(tmp_path, capsys):
    main(["--source", "builtin", "--out", str(tmp_path / "raw.txt"), "--size", "20000", "--seed", "3"])
    assert (tmp_path / "raw.txt").stat().st_size <= 20_000
    assert "wrote" in capsys.readouterr().out


def test_builtin_size_below_one_story_is_an_error(tmp_path):
    with pytest.raises(TinyGPTError, match="smaller than one story"):
        download("builtin", tmp_path / "raw.txt", size=10)
    assert files_in(tmp_path) == []


def test_size_zero_is_an_error(tmp_path):
    with pytest.raises(TinyGPTError, match="--size 0 must be more than 0 bytes"):
        download("builtin", tmp_path / "raw.txt", size="0")


def test_cli_error_is_one_line_and_exit_status_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--source", "builtin", "--out", str(tmp_path / "x.txt"), "--size", "lots"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: --size 'lots'")


# ---------------------------------------------------------------------------------------------- network


def test_url_download_with_checksum(server, tmp_path):
    url = server.route("/a.txt", BODY)
    out = download("url", tmp_path / "raw.txt", urls=[url], sha256s=[sha(BODY)], **FAST)
    assert out.read_bytes() == BODY
    assert files_in(tmp_path) == ["raw.txt"]


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    url = server.route("/drop.txt", BODY, "drop", "ok")
    out = download("url", tmp_path / "raw.txt", urls=[url], sha256s=[sha(BODY)], **FAST)
    assert out.read_bytes() == BODY
    assert server.requests == [("/drop.txt", None), ("/drop.txt", f"bytes={len(BODY) // 2}-")]


def test_a_part_file_left_by_an_interrupted_run_is_resumed(server, tmp_path):
    url = server.route("/big.txt", BODY)
    out = tmp_path / "raw.txt"
    part = _part_path(out, url, None)
    part.write_bytes(BODY[:1000])
    assert download("url", out, urls=[url], sha256s=[sha(BODY)], **FAST).read_bytes() == BODY
    assert server.requests == [("/big.txt", "bytes=1000-")]
    assert files_in(tmp_path) == ["raw.txt"]


def test_resume_answered_with_200_starts_over(server, tmp_path):
    url = server.route("/norange.txt", BODY, "drop", "full")
    out = download("url", tmp_path / "raw.txt", urls=[url], **FAST)
    assert out.read_bytes() == BODY  # not half the body twice
    assert server.requests[1][1] == f"bytes={len(BODY) // 2}-"


def test_503_then_success_is_retried(server, tmp_path):
    url = server.route("/busy.txt", BODY, 503, 429, "ok")
    assert download("url", tmp_path / "raw.txt", urls=[url], **FAST).read_bytes() == BODY
    assert len(server.requests) == 3


def test_404_is_one_clear_error_without_retries(server, tmp_path):
    url = server.route("/gone.txt", BODY, 404)
    with pytest.raises(TinyGPTError, match=re.escape(url) + ".*HTTP 404"):
        download("url", tmp_path / "raw.txt", urls=[url], **FAST)
    assert len(server.requests) == 1 and files_in(tmp_path) == []


def test_persistent_5xx_gives_up_after_the_retries(server, tmp_path):
    url = server.route("/down.txt", BODY, 500)
    with pytest.raises(TinyGPTError, match=re.escape(url) + ".*after 3 attempts.*HTTP 500"):
        download("url", tmp_path / "raw.txt", urls=[url], timeout=5.0, retries=2, backoff=0.0)
    assert len(server.requests) == 3 and files_in(tmp_path) == []


def test_checksum_mismatch_keeps_the_previous_output(server, tmp_path):
    url = server.route("/a.txt", BODY)
    previous = tmp_path / "raw.txt"
    previous.write_text("previous corpus")
    with pytest.raises(TinyGPTError, match="checksum mismatch for " + re.escape(url)):
        download("url", previous, urls=[url], sha256s=["0" * 64], **FAST)
    assert previous.read_text() == "previous corpus"
    assert files_in(tmp_path) == ["raw.txt"]


def test_unreachable_port_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.txt"
    with pytest.raises(TinyGPTError, match=re.escape(url) + ".*cannot connect"):
        download("url", tmp_path / "raw.txt", urls=[url], timeout=2.0, retries=1, backoff=0.0)
    assert files_in(tmp_path) == []


def test_timeout_is_a_clear_error(server, tmp_path):
    url = server.route("/slow.txt", BODY, "slow")
    started = time.monotonic()
    with pytest.raises(TinyGPTError, match=re.escape(url)):
        download("url", tmp_path / "raw.txt", urls=[url], timeout=0.3, retries=0, backoff=0.0)
    assert time.monotonic() - started < 1.5
    assert files_in(tmp_path) == []


def test_tinystories_size_fetches_a_prefix_cut_at_a_document(server, tmp_path):
    url = server.route("/TinyStories.txt", BODY)
    out = download("tinystories", tmp_path / "raw.txt", urls=[url], size=5000, **FAST)
    assert server.requests == [("/TinyStories.txt", "bytes=0-4999")]
    data = out.read_bytes()
    assert data == document_prefix(BODY, 5000) and 4000 < len(data) <= 5000
    assert files_in(tmp_path) == ["raw.txt"]


def test_tinystories_prefix_from_a_server_that_ignores_range(server, tmp_path):
    url = server.route("/TinyStories.txt", BODY, "full")
    data = download("tinystories", tmp_path / "raw.txt", urls=[url], size=5000, **FAST).read_bytes()
    assert data == document_prefix(BODY, 5000)


def test_tinystories_size_beyond_the_file_gets_the_whole_file(server, tmp_path):
    url = server.route("/TinyStories.txt", BODY)
    assert download("tinystories", tmp_path / "raw.txt", urls=[url], size="small", **FAST).read_bytes() == BODY


def test_tinystories_prefix_smaller_than_a_document_is_an_error(server, tmp_path):
    url = server.route("/TinyStories.txt", BODY)
    with pytest.raises(TinyGPTError, match="no complete document"):
        download("tinystories", tmp_path / "raw.txt", urls=[url], size=10, **FAST)
    assert files_in(tmp_path) == []


def test_several_urls_are_joined_with_separators(server, tmp_path):
    one = server.route("/1.txt", b"first file\n")
    two = server.route("/2.txt", b"second file, already separated\n" + SEPARATOR)
    three = server.route("/3.txt", b"third")
    out = download("url", tmp_path / "raw.txt", urls=[one, two, three], **FAST)
    assert out.read_bytes() == (b"first file\n" + SEPARATOR + b"second file, already separated\n" + SEPARATOR
                                + b"third")


def test_a_dash_skips_the_checksum_of_one_url(server, tmp_path):
    one, two = server.route("/1.txt", BODY), server.route("/2.txt", b"tail\n")
    out = download("url", tmp_path / "raw.txt", urls=[one, two], sha256s=["-", sha(b"tail\n")], **FAST)
    assert out.read_bytes() == BODY + b"tail\n"
    with pytest.raises(TinyGPTError, match="checksum mismatch for " + re.escape(two)):
        download("url", tmp_path / "raw.txt", urls=[one, two], sha256s=["-", sha(b"other")], **FAST)


def test_sha256_count_must_match_urls(tmp_path):
    with pytest.raises(TinyGPTError, match="one per URL"):
        download("url", tmp_path / "raw.txt", urls=["http://a/1", "http://a/2"], sha256s=["a" * 64])


# ------------------------------------------------------------------------------------------------ files


def test_file_source_expands_globs_in_order(tmp_path):
    (tmp_path / "in").mkdir()
    for name, text in [("b.txt", "bee"), ("a.txt", f"ay\n{EOT}\n"), ("c.md", "sea")]:
        (tmp_path / "in" / name).write_text(text)
    out = download("file", tmp_path / "raw.txt", paths=[str(tmp_path / "in" / "*.txt"), str(tmp_path / "in/c.md")])
    assert out.read_text() == f"ay\n{EOT}\nbee\n{EOT}\nsea"


def test_file_source_with_a_size_keeps_whole_documents(tmp_path):
    src = tmp_path / "big.txt"
    src.write_bytes(BODY)
    out = download("file", tmp_path / "raw.txt", paths=[str(src)], size=3000)
    assert out.read_bytes() == document_prefix(BODY, 3000)


def test_file_pattern_without_match_names_the_pattern(tmp_path):
    with pytest.raises(TinyGPTError, match=re.escape(f"--path '{tmp_path}/nothing*.txt'")):
        download("file", tmp_path / "raw.txt", paths=[f"{tmp_path}/nothing*.txt"])
    assert files_in(tmp_path) == []


def test_url_files_are_read_in_the_format_their_url_names(server, tmp_path):
    import gzip
    import json

    docs = ["first document\n\nwith two paragraphs", "second"]
    lines = "".join(json.dumps({"text": doc}) + "\n" for doc in docs).encode()
    jsonl = server.route("/data/docs.jsonl.gz?download=true", gzip.compress(lines))  # the query is no name
    text = server.route("/notes.txt", b"plain text")
    out = download("url", tmp_path / "raw.txt", urls=[jsonl, text], **FAST)
    assert out.read_bytes() == f"{docs[0]}\n{EOT}\n{docs[1]}\n{EOT}\nplain text".encode()
    assert files_in(tmp_path) == ["raw.txt"]
    bad = server.route("/bad.jsonl", b'{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(TinyGPTError, match=re.escape(f"{bad} line 2 has no field 'text'")):  # the URL, not the part file
        download("url", tmp_path / "raw.txt", urls=[jsonl, bad], **FAST)
    assert files_in(tmp_path) == ["raw.txt"]


def test_format_settings_apply_to_url_and_file_only(tmp_path):
    with pytest.raises(TinyGPTError, match="--format and --text_field do not apply to --source builtin"):
        download("builtin", tmp_path / "raw.txt", size=20_000, format="jsonl")
    with pytest.raises(TinyGPTError, match="--text_field is empty"):
        download("file", tmp_path / "raw.txt", paths=["x"], text_field="")
