//! MSK IAM tokens (kafka-io's own SigV4 presigning) against AWS's own signer,
//! aws-msk-iam-sasl-signer-python from PyPI (installed by `cargo xtask setup`): the same
//! credentials, region and time give the same token, byte for byte, once our User-Agent
//! parameter carries the signer's value. No network: the signer only signs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use kafka_infer_tests::py;
use kafka_io::aws::{Credentials, msk_token_as};

/// The User-Agent the Python signer puts into its token (ours names kafka-infer).
const SIGNER_AGENT: &str = "aws-msk-iam-sasl-signer-python/1.0.2";

#[test]
fn msk_iam_tokens_equal_those_of_aws_python_signer() -> Result<()> {
    // Now (whole seconds), and a fixed time in another year and month.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let cases: [(&str, u64, &str, &str, Option<&str>); 4] = [
        (
            "us-west-2",
            now,
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
        ),
        (
            "eu-central-1",
            now,
            "ASIAEXAMPLE2",
            "s3cr3t/with+slash=and+plus",
            Some("IQoJb3JpZ2luX2VjEXAMPLE/session+token=="),
        ),
        ("ap-southeast-2", 1_704_164_645, "AKIDEXAMPLE", "x", None),
        (
            "us-gov-west-1",
            1_767_225_599,
            "ASIA3",
            "y+y/y",
            Some("FwoGZXIvYXdzEXAMPLE%token"),
        ),
    ];
    for (region, secs, key, secret, token) in cases {
        let mut args = vec![
            region.to_owned(),
            secs.to_string(),
            key.into(),
            secret.into(),
        ];
        args.extend(token.map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let theirs = py("msk_token.py", &args)?;
        let creds = Credentials {
            access_key_id: key.into(),
            secret_access_key: secret.into(),
            session_token: token.map(Into::into),
            expires: None,
        };
        let at = UNIX_EPOCH + Duration::from_secs(secs);
        let ours = msk_token_as(region, &creds, at, SIGNER_AGENT);
        assert_eq!(
            ours.expose(),
            theirs.trim(),
            "{region} at {secs}, session token {}",
            token.is_some()
        );
    }
    Ok(())
}
