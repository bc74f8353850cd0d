"""moto's server for the aws tests, with KMS Decrypt refusing keys that are disabled or
pending deletion, as AWS KMS does (moto 5.2 decrypts regardless of the key state).

Usage: python moto_server.py -p PORT -H 127.0.0.1   (same arguments as python -m moto.server)
"""
import sys

from moto.core.exceptions import JsonRESTError
from moto.kms.models import KmsBackend

_decrypt = KmsBackend.decrypt


def decrypt(self, ciphertext_blob, encryption_context, key_id=None):
    plaintext, arn = _decrypt(self, ciphertext_blob, encryption_context, key_id)
    key = self.keys[self.get_key_id(arn)]
    if key.key_state == "Disabled":
        raise JsonRESTError("DisabledException", f"{arn} is disabled.")
    if key.key_state == "PendingDeletion":
        raise JsonRESTError("KMSInvalidStateException", f"{arn} is pending deletion.")
    return plaintext, arn


KmsBackend.decrypt = decrypt

if __name__ == "__main__":
    from moto.server import main

    main(sys.argv[1:])
