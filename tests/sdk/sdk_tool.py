"""Drives the real InCountry Python SDK (incountry==5.0.0) for interop tests.

  sdk_tool.py encrypt DOC_FILE PLAINTEXT          -> {"ciphertext": ..., "version": N}
  sdk_tool.py decrypt DOC_FILE CIPHERTEXT VERSION -> {"plaintext": ...}

DOC_FILE holds a secrets document as the daemon serves it; the SDK's own
SecretKeyAccessor validates it exactly as it would in Border.
"""
import json
import sys

from incountry import InCrypto, SecretKeyAccessor


def crypto(doc_file):
    with open(doc_file) as f:
        doc = json.load(f)
    accessor = SecretKeyAccessor(lambda: doc)
    accessor.validate()
    return InCrypto(accessor)


def main(argv):
    cmd = argv[1]
    if cmd == "encrypt":
        enc, version, _ = crypto(argv[2]).encrypt(argv[3])
        print(json.dumps({"ciphertext": enc, "version": version}))
    elif cmd == "decrypt":
        plain = crypto(argv[2]).decrypt(argv[3], int(argv[4]))
        print(json.dumps({"plaintext": plain}))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
