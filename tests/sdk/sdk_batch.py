"""Many InCountry Python SDK (incountry==5.0.0) operations in one process, for tests that
need more than a few (one interpreter start per record would take minutes).

  sdk_batch.py DOC_FILE OPS_FILE -> JSON list, one result per op

OPS_FILE holds a JSON list of ["encrypt", PLAINTEXT] -> {"ciphertext": ..., "version": N}
and ["decrypt", CIPHERTEXT, VERSION] -> {"plaintext": ...}; an op the SDK refuses gives
{"error": "..."}. DOC_FILE holds a secrets document as the daemon serves it; the SDK's own
SecretKeyAccessor validates it exactly as it would in Border.
"""
import json
import sys

from incountry import InCrypto, SecretKeyAccessor


def main(argv):
    with open(argv[1]) as f:
        doc = json.load(f)
    with open(argv[2]) as f:
        ops = json.load(f)
    accessor = SecretKeyAccessor(lambda: doc)
    accessor.validate()
    crypto = InCrypto(accessor)
    out = []
    for op in ops:
        try:
            if op[0] == "encrypt":
                enc, version, _ = crypto.encrypt(op[1])
                out.append({"ciphertext": enc, "version": version})
            elif op[0] == "decrypt":
                out.append({"plaintext": crypto.decrypt(op[1], int(op[2]))})
            else:
                raise SystemExit(f"unknown op {op[0]}")
        except Exception as e:  # the SDK's refusal, per op
            out.append({"error": f"{type(e).__name__}: {e}"})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)
