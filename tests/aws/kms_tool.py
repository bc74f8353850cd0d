"""Sets up and changes KMS state in a moto server for tests/aws.rs. Prints JSON.

  kms_tool.py setup URL
      IAM user with an access key, two CMKs, a 32-byte and a 16-byte data key under the
      first; then turns on moto's request authentication, so wrong credentials fail.
  kms_tool.py datakeys URL AKID SECRET CMK_ARN N      N more 32-byte data keys
  kms_tool.py disable|enable|schedule-deletion|cancel-deletion URL AKID SECRET CMK_ARN
"""
import base64
import json
import sys
import urllib.request

import boto3

REGION = "eu-central-1"


def b64(b):
    return base64.b64encode(b).decode()


def client(service, url, akid="testing", secret="testing"):
    return boto3.client(
        service,
        region_name=REGION,
        endpoint_url=url,
        aws_access_key_id=akid,
        aws_secret_access_key=secret,
    )


def data_key(kms, arn, nbytes=32):
    r = kms.generate_data_key(KeyId=arn, NumberOfBytes=nbytes)
    return {"blob": b64(r["CiphertextBlob"]), "plaintext": b64(r["Plaintext"])}


def setup(url):
    iam = client("iam", url)
    iam.create_user(UserName="keyd")
    iam.put_user_policy(
        UserName="keyd",
        PolicyName="all",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        ),
    )
    ak = iam.create_access_key(UserName="keyd")["AccessKey"]
    kms = client("kms", url)
    cmk_a = kms.create_key(Description="customer key A")["KeyMetadata"]["Arn"]
    cmk_b = kms.create_key(Description="customer key B")["KeyMetadata"]["Arn"]
    key32 = data_key(kms, cmk_a, 32)
    key16 = data_key(kms, cmk_a, 16)
    # From here on every request must be signed by a known access key.
    req = urllib.request.Request(
        url + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(req).read()
    return {
        "region": REGION,
        "access_key_id": ak["AccessKeyId"],
        "secret_access_key": ak["SecretAccessKey"],
        "cmk_a": cmk_a,
        "cmk_b": cmk_b,
        "key32": key32,
        "key16": key16,
    }


def main(argv):
    cmd, url = argv[0], argv[1]
    if cmd == "setup":
        out = setup(url)
    else:
        akid, secret, arn = argv[2], argv[3], argv[4]
        kms = client("kms", url, akid, secret)
        # moto's key-state calls want the key id (AWS also takes the ARN).
        kid = arn.split("/")[-1]
        if cmd == "datakeys":
            out = [data_key(kms, arn) for _ in range(int(argv[5]))]
        elif cmd == "disable":
            out = kms.disable_key(KeyId=kid)
        elif cmd == "enable":
            out = kms.enable_key(KeyId=kid)
        elif cmd == "schedule-deletion":
            out = kms.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
        elif cmd == "cancel-deletion":
            out = kms.cancel_key_deletion(KeyId=kid)
        else:
            raise SystemExit(f"unknown command {cmd}")
        out = {k: v for k, v in out.items() if k != "ResponseMetadata"} if isinstance(out, dict) else out
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
