"""An MSK IAM token made by AWS's own signer, aws-msk-iam-sasl-signer-python (its token
construction, at a given time with given credentials, as the notes in docs/notes-msk-iam.md).

usage: msk_token.py REGION UNIX_SECONDS ACCESS_KEY_ID SECRET_ACCESS_KEY [SESSION_TOKEN]
prints the token (base64url, no padding)
"""
import datetime
import sys
from unittest import mock

import botocore.auth
from botocore.credentials import Credentials
from aws_msk_iam_sasl_signer import MSKAuthTokenProvider as provider

region, seconds, key_id, secret = sys.argv[1:5]
session_token = sys.argv[5] if len(sys.argv) > 5 else None
at = datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc).replace(tzinfo=None)
construct = getattr(provider, "__construct_auth_token")
creds = Credentials(key_id, secret, session_token)
with mock.patch.object(botocore.auth, "get_current_datetime", return_value=at):
    token, _expiry_ms = construct(region, creds)
print(token)
