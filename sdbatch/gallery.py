"""`python -m sdbatch.gallery DIR...`: the `sdbatch-gallery` command (sdbatch.cli.gallery)."""

from sdbatch.cli.gallery import console

if __name__ == "__main__":
    console()
