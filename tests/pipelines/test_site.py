"""`medgen report`: pages written by every run-folder command, the site built from smoke runs, and the site
opened in headless Chromium (skipped when no Chromium is installed).

The browser is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: fds 3 and 4,
NUL-separated JSON), with no client library and nothing downloaded: console messages, uncaught exceptions,
failed loads, every image's decoded size, every link, and a screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medgen.cli.main import app
from medgen.config import TrainConfig
from medgen.data.scenes import load_scene_dataset
from medgen.errors import MedgenError
from medgen.pipelines.site import build_site, detect_kind, find_runs, write_run_page
from medgen.training.loop import fit

pytestmark = pytest.mark.usefixtures("one_thread")

AFFINE = np.array([[6.0, 0, 0, -45], [0, 6.0, 0, -45], [0, 0, 6.0, -45], [0, 0, 0, 1]])


def invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One smoke run of each kind: train (vae), cv-evaluate (one generator), segment, evaluate-synth JSON, and the
    autoencoder toolkit (a one-class vae with its anomaly, denoise and traverse runs)."""
    d = tmp_path_factory.mktemp("site-runs")
    rng = np.random.default_rng(0)
    rows = ["path\tdiagnosis\tparticipant"]
    for i in range(16):
        x = rng.random((16, 16, 16)).astype(np.float32) + 0.5 * (i % 2)
        nib.save(nib.Nifti1Image(x, AFFINE), str(d / f"p{i:02d}.nii.gz"))
        rows.append(f"p{i:02d}.nii.gz\t{['healthy', 'tumour'][i % 2]}\tP{i:02d}")
    (d / "table.tsv").write_text("\n".join(rows) + "\n")
    cfg = d / "tiny.yaml"
    cfg.write_text("data: {size: 16}\nmodels:\n  vae: {base_width: 4, latent_dim: 8}\n"
                   "train: {log_every: 1, sample_every: 1, checkpoint_every: 2, ema_decay: 0.5}\n")
    cols = ["--image-column", "path", "--label-column", "diagnosis", "--group-column", "participant"]
    out = d / "runs"
    invoke("train", "vae", "--data", d / "table.tsv", *cols, "--out", out / "vae", "--config", cfg,
           "--iterations", 3, "--batch-size", 2, "--device", "cpu", "--precision", "fp32")
    invoke("cv-evaluate", "--out", out / "cv", "--config", "smoke", "--data", d / "table.tsv", *cols, "--models", "vae")
    invoke("evaluate-synth", "--checkpoint", out / "vae", "--data", d / "table.tsv", *cols, "--config", cfg,
           "--classifier-iterations", 2, "--pairs", 2, "--json", out / "vae" / "synth-metrics.json")
    (out / "quality").mkdir()  # the same result on its own, as `medgen report` also takes one
    shutil.copyfile(out / "vae" / "synth-metrics.json", out / "quality" / "quality.json")
    scenes = d / "scenes"
    invoke("scenes", "--out", scenes, "--n", 2, "--frames", 2, "--size", 32, "--seed", 1)
    train = TrainConfig(iterations=2, batch_size=2, ema_decay=0.0, precision="fp32", log_every=1, sample_every=0,
                        checkpoint_every=0)
    pvae = fit("parallel-vae", load_scene_dataset(scenes), d / "pvae", train=train, device="cpu", seed=0,
               model_kwargs=dict(num_decoders=3, latent_per_decoder=4, base_width=4))
    invoke("segment", "--checkpoint", pvae.checkpoint, "--data", scenes, "--out", out / "seg", "--panels", 2)
    # the autoencoder toolkit: a vae trained on one class with held-out subjects, then its three commands
    invoke("train", "vae", "--data", d / "table.tsv", *cols, "--out", out / "vae-healthy", "--config", cfg,
           "--iterations", 2, "--batch-size", 2, "--device", "cpu", "--precision", "fp32",
           "--classes", "healthy", "--holdout", 0.5)
    toolkit = ["--checkpoint", out / "vae-healthy", "--device", "cpu"]  # the data the run trained on
    invoke("anomaly", *toolkit, "--out", out / "anomaly")
    invoke("denoise", *toolkit, "--out", out / "denoise", "--levels", "0.05,0.2")
    invoke("traverse", *toolkit, "--out", out / "traverse", "--steps", 3, "--dims", 2)
    site = d / "site"
    r = invoke("report", out, "--out", site)
    return {"root": out, "site": site, "summary": json.loads(r.stdout)}


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.tables: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("href", "src"):
            if a.get(name) is not None:
                self.refs.append((tag, a[name]))
        if tag == "table":
            self.tables.append(a.get("class", ""))


def _refs(page: Path) -> _Refs:
    p = _Refs()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def _check_page_files(page: Path) -> None:
    """Every href/src of a page is a relative path to a file that exists (or a fragment / data: URL)."""
    for tag, ref in _refs(page).refs:
        if ref.startswith("#") or ref.startswith("data:"):
            continue
        assert "://" not in ref and not ref.startswith("/"), f"{page}: {tag} {ref} is not relative"
        assert (page.parent / unquote(ref.split("#")[0])).is_file(), f"{page}: {tag} {ref} does not resolve"


def test_every_run_command_writes_its_page(runs):
    root = runs["root"]
    for name, kind in (("vae", "train"), ("cv", "cv-evaluate"), ("seg", "segment"), ("vae-healthy", "train"),
                       ("anomaly", "anomaly"), ("denoise", "denoise"), ("traverse", "traverse")):
        page = root / name / "index.html"
        assert page.is_file(), f"{name} has no page"
        assert detect_kind(root / name) == kind
        _check_page_files(page)
        assert f"{kind}: {name}" in page.read_text(encoding="utf-8")
    assert detect_kind(root / "quality") == "evaluate-synth"
    assert detect_kind(root / "quality" / "quality.json") == "evaluate-synth"


def test_report_collects_every_run_into_a_self_contained_site(runs):
    site, summary = runs["site"], runs["summary"]
    assert summary["runs"] == 8 and summary["kinds"] == {"train": 2, "cv-evaluate": 1, "segment": 1,
                                                         "evaluate-synth": 1, "anomaly": 1, "denoise": 1,
                                                         "traverse": 1}
    index = site / "index.html"
    _check_page_files(index)
    refs = list(dict.fromkeys(r for t, r in _refs(index).refs if t == "a"))  # name and preview link the page
    assert len(refs) == 8 and all((site / r).is_file() for r in refs)
    for r in refs:
        _check_page_files(site / r)
    cv = (site / "runs" / "cv" / "index.html").read_text(encoding="utf-8")
    assert "Verdict" in cv and "Real only: test balanced accuracy" in cv and "Fold 1" in cv
    assert "fold models&#39; ensemble" in cv or "fold models' ensemble" in cv  # the verdict gives the ensemble too
    assert "classifier, real only" in cv and "data sortable val-metrics" in cv  # the classifier's validation
    assert {"data sortable results", "data sortable fold-arms"} <= set(_refs(site / "runs" / "cv" / "index.html").tables)
    train = (site / "runs" / "vae" / "index.html").read_text(encoding="utf-8")
    assert "<svg" in train and "iteration 3" in train and "Resolved config" in train and "latent_dim" in train
    assert "Synthesis quality (synth-metrics.json)" in train  # evaluate-synth --json RUN/... redrew the page
    assert "Synthesis quality (synth-metrics.json)" in (runs["root"] / "vae" / "index.html").read_text("utf-8")
    seg = (site / "runs" / "seg" / "index.html").read_text(encoding="utf-8")
    assert "fg_ari" in seg and "baseline (majority)" in seg and "traversal.png" in seg
    assert "<th scope=\"col\">kmeans</th>" in seg and "<th scope=\"col\">gmm</th>" in seg  # colour baselines
    metrics = json.loads((runs["root"] / "seg" / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {"kmeans", "gmm"} and "fg_ari" in metrics["baselines"]["kmeans"]["scenes"]
    synth = (site / "runs" / "quality" / "index.html").read_text(encoding="utf-8")
    assert "ms_ssim_synthetic" in synth and "healthy" in synth
    # the site is a medgen output folder: refused when it exists, never collected as runs itself
    r = CliRunner().invoke(app, ["report", str(runs["root"]), "--out", str(site)])
    assert r.exit_code == 1 and "already exists" in r.output
    assert site not in find_runs([site.parent]) and all("site" not in p.parts for p in find_runs([site.parent]))


def test_report_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "site")])
    assert r.exit_code == 1 and "holds no medgen run folder" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "site").exists()
    with pytest.raises(MedgenError, match="not a run folder"):
        write_run_page(tmp_path / "missing.json")


def test_cv_folder_before_merge_gets_a_page(runs, tmp_path):
    cv = tmp_path / "cv"
    shutil.copytree(runs["root"] / "cv", cv, ignore=shutil.ignore_patterns("*.pt"))
    for name in ("results.json", "results.md", "results.csv", "accuracy.png", "confusion.png", "index.html"):
        (cv / name).unlink()
    shutil.rmtree(cv / "fold_1")
    page = write_run_page(cv)
    text = page.read_text(encoding="utf-8")
    assert "not merged yet: 1 of 2 folds" in text and "Fold 0" in text
    _check_page_files(page)
    build_site([cv], tmp_path / "site")  # a one-run site


# ---------------------------------------------------------------------------------------------- the browser

CHROMIUM = os.environ.get("MEDGEN_CHROMIUM") or next(
    (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe."""

    def __init__(self, user_dir: Path, width: int = 1280, height: int = 900) -> None:
        cmd_r, self._w = os.pipe()  # we write commands, Chromium reads fd 3
        self._r, out_w = os.pipe()  # Chromium writes fd 4

        def fds() -> None:
            a, b = os.dup(cmd_r), os.dup(out_w)  # dup first: the pipe ends may already be 3 or 4
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", "--remote-debugging-pipe",
                                      f"--window-size={width},{height}", "about:blank"],
                                     preexec_fn=fds, close_fds=False,  # close_fds would close 3 and 4 after preexec_fn
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id, self.events = b"", 0, []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=True)

    def _message(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._message(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def open(self, url: str, timeout: float = 60) -> list[str]:
        """Navigate and wait for the load event; return the problems the page reported meanwhile."""
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=True)
        end = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._message(max(0.1, end - time.monotonic())))
        self.evaluate("new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)))")
        return self.problems()

    def problems(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}")
            elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                out.append(f"load failed: {p.get('errorText')}")
            elif m == "Network.requestWillBeSent":
                url = p.get("request", {}).get("url", "")
                if not url.startswith(("file:", "data:", "about:")):
                    out.append(f"network request: {url}")
        return out

    def evaluate(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      session=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, full: bool = False) -> Image.Image:
        params: dict = {"format": "png"}
        if full:  # the whole page, not only the viewport
            size = self.send("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size["width"],
                                                            "height": min(size["height"], 12000), "scale": 1})
        data = self.send("Page.captureScreenshot", params, session=True)["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._w)
        os.close(self._r)


PAGE_FACTS = """(() => ({
  title: document.title,
  text: document.body ? document.body.innerText.length : 0,
  images: [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0,
                                          w: i.naturalWidth})),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  tables: [...document.querySelectorAll('table')].map(t => ({cls: t.className, rows: t.tBodies.length ?
                                                             t.tBodies[0].rows.length : t.rows.length})),
  svgs: document.querySelectorAll('svg').length,
  verdict: document.querySelectorAll('ul.verdict li').length,
}))()"""


def _not_blank(img: Image.Image) -> bool:
    small = np.asarray(img.resize((160, 112)), dtype=np.float32)
    return float(small.std()) > 10 and len(np.unique(small.reshape(-1, 3), axis=0)) > 20


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian package `chromium`)")
def test_site_renders_in_headless_chromium(runs, tmp_path):
    site = runs["site"]
    shots = Path(os.environ["MEDGEN_REPORT_SHOTS"]) if os.environ.get("MEDGEN_REPORT_SHOTS") else tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    browser = Browser(tmp_path / "profile")
    try:
        todo, seen, facts = [(site / "index.html").as_uri()], set(), {}
        while todo:  # crawl: the index, then every page it links to
            url = todo.pop(0)
            if url in seen:
                continue
            seen.add(url)
            problems = browser.open(url)
            assert not problems, f"{url}: {problems}"
            f = browser.evaluate(PAGE_FACTS)
            facts[url] = f
            assert f["text"] > 200, f"{url}: almost no text rendered"
            bad = [i["src"] for i in f["images"] if not i["ok"]]
            assert not bad, f"{url}: images that did not load: {bad}"
            for link in f["links"]:
                u = urlparse(link)
                assert u.scheme == "file", f"{url}: link {link} leaves the site"
                target = Path(unquote(u.path))
                assert target.is_file(), f"{url}: link {link} does not resolve"
                if target.name == "index.html" and site in target.parents:
                    todo.append(target.as_uri())
            img = browser.screenshot()
            name = "index" if Path(urlparse(url).path) == site / "index.html" else Path(urlparse(url).path).parent.name
            img.save(shots / f"{name}.png")
            assert _not_blank(img), f"{url}: the screenshot is blank"
        index = facts[(site / "index.html").as_uri()]
        assert {"data sortable runs"} <= {t["cls"] for t in index["tables"]}
        assert next(t for t in index["tables"] if "runs" in t["cls"])["rows"] == 8
        assert len(facts) == 9  # the index and eight run pages
        pages = {Path(urlparse(u).path).parent.name: f for u, f in facts.items()}
        assert pages["cv"]["verdict"] >= 1 and any("results" in t["cls"] for t in pages["cv"]["tables"])
        assert any("accuracy.png" in i["src"] for i in pages["cv"]["images"])
        assert pages["vae"]["svgs"] >= 1 and sum("samples/iter_" in i["src"] for i in pages["vae"]["images"]) == 3
        assert any("panels/" in i["src"] for i in pages["seg"]["images"])
        assert any("scores" in t["cls"] for t in pages["seg"]["tables"])
        assert any("scores" in t["cls"] for t in pages["quality"]["tables"])
        # the autoencoder toolkit: anomaly AUCs and its ROC / overlays, the denoising table, the traversal strips
        assert any("scores" in t["cls"] for t in pages["anomaly"]["tables"])
        assert {"roc.png", "overlays.png"} <= {Path(urlparse(i["src"]).path).name for i in pages["anomaly"]["images"]}
        assert any("scores" in t["cls"] and t["rows"] == 2 for t in pages["denoise"]["tables"])  # two noise levels
        assert pages["denoise"]["images"] and pages["traverse"]["images"]
        assert all(i["w"] > 0 for i in pages["traverse"]["images"])
        # the pages the commands wrote into their run folders render too, with their images in place
        for name in ("vae", "cv", "seg", "anomaly", "denoise", "traverse"):
            url = (runs["root"] / name / "index.html").as_uri()
            assert not browser.open(url), url
            f = browser.evaluate(PAGE_FACTS)
            assert f["images"] and all(i["ok"] for i in f["images"]), url
        # sorting: clicking the run column twice orders the rows descending by name
        browser.open((site / "index.html").as_uri())
        order = browser.evaluate("""(() => { const th = document.querySelector('#runs th');
            th.click(); const up = [...document.querySelectorAll('#runs tbody tr td:first-child')].map(c => c.textContent);
            th.click(); const down = [...document.querySelectorAll('#runs tbody tr td:first-child')].map(c => c.textContent);
            return {up, down, sort: th.getAttribute('aria-sort')}; })()""")
        assert order["up"] == sorted(order["up"]) and order["down"] == order["up"][::-1]
        assert order["sort"] == "descending" and not browser.problems()
        shown = browser.evaluate("""(() => { const f = document.getElementById('filter'); f.value = 'segment';
            f.dispatchEvent(new Event('input'));
            return [...document.querySelectorAll('#runs tbody tr')].filter(r => !r.hidden).length; })()""")
        assert shown == 1 and len(index["images"]) >= 3  # the filter; a preview per run with pictures
    finally:
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian package `chromium`)")
def test_the_browser_check_sees_a_broken_page(tmp_path):
    """The harness is not blind: a missing image and a script error are reported."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><p>x</p>'
                    '<img src="missing.png"><script>undefinedFunction()</script></body></html>')
    browser = Browser(tmp_path / "profile")
    try:
        problems = browser.open(page.as_uri())
        facts = browser.evaluate(PAGE_FACTS)
    finally:
        browser.close()
    assert any("exception" in p for p in problems) and any("load failed" in p for p in problems)
    assert [i["ok"] for i in facts["images"]] == [False]
