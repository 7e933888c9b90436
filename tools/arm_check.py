"""``python -m tools.arm_check``: the device side on aarch64, as a Raspberry Pi runs it.

Builds (once, cached under ``.cache/arm64``) an arm64 Debian root with Debian's own
tools, installs the package there from a wheel of this source tree with its
``litert`` extra (numpy, Pillow, requests and ai-edge-litert come from PyPI as
aarch64 wheels), runs ``enfpire-client extract --json`` on the shared sample
photos inside it, and checks each feature against the same command on this
x86-64 machine: cosine >= 0.9999 with ``--reference-kernels`` (TFLite's
reference kernels, the same bits on every CPU), >= 0.99 with the default fast
kernels, whose rounding differs per architecture (measured 0.997-0.998).

Emulation: every arm64 program runs under ``qemu-aarch64-static`` named
explicitly through ``proot -q``, never through a binfmt_misc handler. Registering
one needs a writable ``/proc/sys/fs/binfmt_misc``, which containers and CI
sandboxes often lack, and changes the whole machine; proot intercepts every
``execve`` (dpkg's maintainer scripts, pip's subprocesses) and puts qemu in
front, so the same commands work with or without binfmt_misc. That is also why
the root is made with ``debootstrap --foreign`` and its second stage runs under
proot. Needs root (debootstrap makes device nodes and root-owned files).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CACHE = ROOT / ".cache" / "arm64"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = "python3,python3-venv,ca-certificates"
VENV = "/opt/enfpire"
MIN_COSINE = 0.9999
#: Pinned in the arm64 venv to this machine's versions, so a difference is the architecture's.
PINNED = ("numpy", "Pillow", "ai-edge-litert")
TOOLS = ("debootstrap", "proot", "qemu-aarch64-static")
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def log(message: str) -> None:
    print(f"arm-check: {message}", flush=True)


def run(*command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """A command that must succeed; its output is shown only when it fails."""
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"arm-check: failed ({done.returncode}): {' '.join(command)}")
    return done


def guest(root: Path, *command: str, binds: dict[Path, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an arm64 command inside ``root`` with qemu in front of every program it starts."""
    args = ["proot", "-q", "qemu-aarch64-static", "-r", str(root), "-w", "/"]
    binds = dict(binds or {})
    # A clean environment: the host's PATH, PYTHON* and pip settings mean nothing inside. The host's
    # proxy and CA bundle do: a network that inspects TLS is trusted by the host's bundle only.
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           **{name: os.environ[name] for name in PROXY_VARIABLES if name in os.environ}}
    bundle = host_ca_bundle()
    if bundle is not None:
        binds[bundle] = "/etc/enfpire-host-ca.crt"
        env["PIP_CERT"] = env["SSL_CERT_FILE"] = "/etc/enfpire-host-ca.crt"
    for host, inside in binds.items():
        args += ["-b", f"{host}:{inside}"]
    return run(*args, *command, env=env)


def host_ca_bundle() -> Path | None:
    """The CA bundle this machine trusts (pip's own setting first), if there is one."""
    for name in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if name and Path(name).is_file():
            return Path(name).resolve()
    return None


def private_mounts() -> list[str]:
    """``unshare`` into a private mount namespace when allowed: the second stage mounts /proc and
    /sys inside the root, and a namespace drops them even if the run is killed half-way."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return ["unshare", "--mount", "--propagation", "private"] if probe.returncode == 0 else []


def build_root(cache: Path) -> Path:
    """The arm64 Debian root, made once: debootstrap's first stage on the host, its second under qemu."""
    root = cache / "root"
    if (root / "usr" / "bin" / "python3").exists():
        return root
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"arm-check: missing {', '.join(missing)} (apt-get install debootstrap proot qemu-user-static)")
    partial = cache / "root.partial"
    if partial.exists():
        run("rm", "-rf", "--one-file-system", str(partial))
    cache.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap --foreign: Debian {SUITE} arm64 into {partial}")
    run("debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}", SUITE,
        str(partial), MIRROR)
    log("second stage under qemu-aarch64-static (several minutes)")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "DEBOOTSTRAP_DIR": "/debootstrap"}
    run(*private_mounts(), "proot", "-q", "qemu-aarch64-static", "-r", str(partial), "-w", "/",
        "/debootstrap/debootstrap", "--second-stage", env=env)
    partial.rename(root)  # only a finished root is ever reused
    return root


def wheel(out: Path) -> Path:
    """A wheel of this source tree (pure Python, so the same on arm64), built from a copy: a run
    under sudo leaves no root-owned build/ or egg-info in the checkout."""
    source = out.parent / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".cache", ".pytest_cache", "out", "build", "dist", "*.egg-info", "__pycache__", "models", "tests", "docs", "examples"))
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source))
    return next(out.glob("enfpire-*.whl"))


def install(root: Path, wheel_path: Path) -> str:
    """The package with its ``litert`` extra in a venv inside the root; the dependencies once, ours every run."""
    binds = {wheel_path.parent: "/wheels"}
    inside = f"/wheels/{wheel_path.name}"
    pins = "\n".join(f"{name}=={importlib.metadata.version(name)}" for name in PINNED)
    stamp = root / VENV.lstrip("/") / ".enfpire-deps"
    if not stamp.exists() or stamp.read_text() != pins:
        log(f"pip install enfpire[litert] from PyPI in the arm64 root ({', '.join(pins.splitlines())})")
        (wheel_path.parent / "pins.txt").write_text(pins + "\n")
        guest(root, "python3", "-m", "venv", VENV)
        guest(root, f"{VENV}/bin/pip", "install", "--quiet", "--only-binary=:all:", "-c", "/wheels/pins.txt",
              f"{inside}[litert]", binds=binds)
        stamp.write_text(pins)
    guest(root, f"{VENV}/bin/pip", "install", "--quiet", "--no-deps", "--force-reinstall", inside, binds=binds)
    versions = guest(root, f"{VENV}/bin/python", "-c", "import platform, numpy, PIL, ai_edge_litert; "
                     "print(platform.machine(), 'numpy', numpy.__version__, 'Pillow', PIL.__version__)")
    return versions.stdout.strip()


def sample_photos(folder: Path) -> list[Path]:
    """The shared sample photos: the models' test photos, a few of each dataset's, and one made 12 MP."""
    photos = [SHARED / "models" / name for name in ("parrot.jpg", "cat.bmp", "grace_hopper.bmp")]
    for dataset in ("wa-landmarks", "ie-tower"):
        found = sorted((SHARED / "datasets" / dataset / "images").glob("*/*.jpg"))
        photos += found[:: max(1, len(found) // 3)][:3]
    photos = [p for p in photos if p.is_file()]
    big = folder / "twelve-megapixel.jpg"  # the draft-mode JPEG decode, as a phone's photo
    Image.open(photos[-1]).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(big, quality=92)
    copies = []
    for i, photo in enumerate(photos + [big]):
        copy = folder / f"{i:02d}-{photo.name}"
        shutil.copyfile(photo, copy)
        copies.append(copy)
    big.unlink()
    return copies


def features(lines: str) -> dict[str, np.ndarray]:
    """photo name -> feature, from ``enfpire-client extract --json`` output."""
    out = {}
    for line in lines.splitlines():
        item = json.loads(line)
        out[Path(item["photo"]).name] = np.asarray(item["feature"], dtype=np.float64)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the arm64 root is kept")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "mobilenet_v2_1.0_224_quant_avgpool.tflite")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    root = build_root(args.cache)
    built = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="enfpire-arm-") as tmp:
        work = Path(tmp)
        (work / "wheels").mkdir()
        (work / "photos").mkdir()
        shutil.copyfile(args.model, work / "photos" / "model.tflite")
        versions = install(root, wheel(work / "wheels"))
        installed = time.perf_counter()
        photos = sample_photos(work / "photos")
        cosines: dict[str, dict[str, float]] = {}
        timings = {}
        for kernels, flags in KERNELS.items():
            start = time.perf_counter()
            arm = guest(root, f"{VENV}/bin/enfpire-client", "extract", "--json", *flags, "--model",
                        "/check/model.tflite", *[f"/check/{p.name}" for p in photos], binds={work / "photos": "/check"})
            timings[kernels] = time.perf_counter() - start
            x86 = run(sys.executable, "-m", "edge_client.cli", "extract", "--json", *flags, "--model", str(args.model),
                      *map(str, photos), cwd=ROOT)
            cosines[kernels] = compare(features(x86.stdout), features(arm.stdout))
    log(f"arm64 root: {versions}; interpreter {json.loads(arm.stdout.splitlines()[0])['interpreter']}")
    print(f"  {'fast':>9}  {'reference':>9}  photo (cosine of the arm64 feature with the x86-64 one)")
    for name in cosines["reference"]:
        print(f"  {cosines['fast'].get(name, float('nan')):9.6f}  {cosines['reference'][name]:9.6f}  {name}")
    log(f"runtime {time.perf_counter() - started:.0f} s (root {built - started:.0f} s, install {installed - built:.0f} s, "
        + ", ".join(f"{len(photos)} photos with {k} kernels on arm64 {t:.0f} s" for k, t in timings.items()) + ")")
    return verdict(cosines, len(photos))


#: Reference kernels compute the same bits on every CPU: the check of everything around them (decode,
#: EXIF, resize, quantisation, normalisation). The fast kernels (XNNPACK) round differently per
#: architecture, about as far from each other as either is from the reference: reported, held to 0.99.
KERNELS = {"fast": (), "reference": ("--reference-kernels",)}
MIN_COSINE_FAST = 0.99


def compare(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(ours[name] @ theirs[name] / np.linalg.norm(ours[name]) / np.linalg.norm(theirs[name]))
            for name in ours if name in theirs}


def verdict(cosines: dict[str, dict[str, float]], photos: int) -> int:
    exact, fast = min(cosines["reference"].values()), min(cosines["fast"].values())
    if any(len(c) != photos for c in cosines.values()) or exact < MIN_COSINE or fast < MIN_COSINE_FAST:
        log(f"FAILED: min cosine {exact:.6f} (reference kernels, needs {MIN_COSINE}), {fast:.6f} (fast, needs "
            f"{MIN_COSINE_FAST}), or photos missing")
        return 1
    log(f"passed: {photos} photos, min cosine {exact:.6f} >= {MIN_COSINE} with reference kernels, "
        f"{fast:.6f} with the fast ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
