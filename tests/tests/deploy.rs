//! deploy/: the Kubernetes manifests validate against Kubernetes' schemas (kubernetes-validate,
//! strict), the KEDA objects carry the fields KEDA requires, and they agree with what kafka-infer
//! itself derives from the SeldonDeployment in the ConfigMap (group, topic, ports).

use anyhow::Result;
use kafka_infer_tests::{models::kafka_infer_bin, repo_root, venv};
use serde_norway::Value;

fn docs(file: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(repo_root().join("deploy").join(file))?;
    Ok(text
        .split("\n---")
        .map(serde_norway::from_str::<Value>)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|v| !v.is_null())
        .collect())
}

fn kind<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(k))
        .unwrap_or_else(|| panic!("no {k}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

#[test]
fn kubernetes_objects_validate_strictly() {
    let out = std::process::Command::new(venv().join("bin/kubernetes-validate"))
        .args(["--strict", "--no-warn"])
        .arg(repo_root().join("deploy/kafka-infer.yaml"))
        .output()
        .expect("kubernetes-validate (cargo xtask setup installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("passed").count(),
        2,
        "ConfigMap and Deployment checked: {text}"
    );
}

#[test]
fn keda_and_kafka_infer_agree() -> Result<()> {
    let app = docs("kafka-infer.yaml")?;
    let keda = docs("keda-scaledobject.yaml")?;
    let dep = kind(&app, "Deployment");
    let so = kind(&keda, "ScaledObject");
    let ta = kind(&keda, "TriggerAuthentication");
    assert_eq!(s(&so["apiVersion"]), "keda.sh/v1alpha1");
    assert_eq!(s(&ta["apiVersion"]), "keda.sh/v1alpha1");
    assert_eq!(
        s(&so["spec"]["scaleTargetRef"]["name"]),
        s(&dep["metadata"]["name"])
    );
    let trig = &so["spec"]["triggers"][0];
    assert_eq!(s(&trig["type"]), "kafka");
    for field in ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"] {
        assert!(
            trig["metadata"][field].is_string(),
            "trigger metadata.{field} must be a string"
        );
    }
    assert_eq!(
        s(&trig["authenticationRef"]["name"]),
        s(&ta["metadata"]["name"])
    );
    let params: Vec<&str> = ta["spec"]["secretTargetRef"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| s(&p["parameter"]))
        .collect();
    for p in ["tls", "ca", "cert", "key"] {
        assert!(params.contains(&p), "TriggerAuthentication lacks {p}");
    }

    // What kafka-infer makes of the pod's configuration.
    let pod = &dep["spec"]["template"]["spec"];
    let ki = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| s(&c["name"]) == "kafka-infer")
        .unwrap();
    let cm = kind(&app, "ConfigMap");
    let dir = tempfile::tempdir()?;
    let sdep = dir.path().join("sdep.yaml");
    std::fs::write(&sdep, s(&cm["data"]["seldondeployment.yaml"]))?;
    let mut cmd = std::process::Command::new(kafka_infer_bin());
    cmd.args(["run", "-f"])
        .arg(&sdep)
        .arg("--print-config")
        .env_clear();
    for e in ki["env"].as_sequence().unwrap() {
        if let Some(v) = e["value"].as_str() {
            cmd.env(s(&e["name"]), v);
        }
    }
    cmd.env("POD_NAMESPACE", s(&dep["metadata"]["namespace"]));
    let out = cmd.output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        cfg["group_id"].as_str(),
        trig["metadata"]["consumerGroup"].as_str(),
        "KEDA watches kafka-infer's group"
    );
    assert_eq!(
        cfg["input_topic"].as_str(),
        trig["metadata"]["topic"].as_str()
    );
    assert_eq!(
        cfg["brokers"][0].as_str(),
        trig["metadata"]["bootstrapServers"].as_str()
    );
    assert_eq!(cfg["security_protocol"], "Ssl");
    assert_eq!(
        cfg["graph"]["url"], "http://127.0.0.1:8501",
        "the model in the same pod"
    );
    // Probes and scrape annotations point at what kafka-infer serves.
    let port = cfg["metrics_addr"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let cport = ki["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| s(&p["name"]) == "metrics")
        .unwrap();
    assert_eq!(cport["containerPort"].as_u64().unwrap().to_string(), port);
    assert_eq!(s(&ki["livenessProbe"]["httpGet"]["path"]), "/live");
    assert_eq!(s(&ki["readinessProbe"]["httpGet"]["path"]), "/ready");
    let ann = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(s(&ann["prometheus.io/port"]), port);
    assert_eq!(s(&ann["prometheus.io/path"]), "/metrics");
    Ok(())
}

#[test]
fn the_sample_seldondeployment_is_read_as_seldon_would() -> Result<()> {
    let out = std::process::Command::new(kafka_infer_bin())
        .args(["run", "-f"])
        .arg(repo_root().join("deploy/seldondeployment-cifar10.yaml"))
        .arg("--print-config")
        .env_clear()
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(cfg["group_id"], "model.tfserving-cifar10.kafka");
    assert_eq!(cfg["protocol"], "tensorflow");
    Ok(())
}
