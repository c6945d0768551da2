//! deploy/: the Kubernetes manifests validate against Kubernetes' schemas (kubernetes-validate,
//! strict), the KEDA objects carry the fields KEDA requires, and they agree with what kafka-infer
//! itself derives from the SeldonDeployment in the ConfigMap (group, topic, ports), and the pod
//! starts on a real kubelet (its runAsNonRoot rule) with the least it needs (issue 19).

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
        3,
        "ConfigMap, Deployment and NetworkPolicy checked: {text}"
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

/// The Prometheus-scaler example: the fields KEDA requires (serverAddress, query, threshold as
/// strings; a number threshold), the same Deployment and input topic as the record-count
/// ScaledObject, and a query on the gauge kafka-infer exports.
#[test]
fn keda_prometheus_scaler_on_lag_seconds_has_what_keda_requires() -> Result<()> {
    let app = docs("kafka-infer.yaml")?;
    let by_count = docs("keda-scaledobject.yaml")?;
    let by_age = docs("keda-scaledobject-lag-seconds.yaml")?;
    assert_eq!(by_age.len(), 1, "one ScaledObject");
    let so = kind(&by_age, "ScaledObject");
    assert_eq!(s(&so["apiVersion"]), "keda.sh/v1alpha1");
    assert!(so["metadata"]["name"].is_string());
    let dep = kind(&app, "Deployment");
    assert_eq!(
        s(&so["spec"]["scaleTargetRef"]["name"]),
        s(&dep["metadata"]["name"])
    );
    assert_eq!(
        s(&so["metadata"]["namespace"]),
        s(&dep["metadata"]["namespace"])
    );
    // A gauge from running replicas: never scaled to zero.
    assert!(so["spec"]["minReplicaCount"].as_u64().unwrap() >= 1);
    let trig = &so["spec"]["triggers"][0];
    assert_eq!(s(&trig["type"]), "prometheus");
    let m = &trig["metadata"];
    for field in ["serverAddress", "query", "threshold"] {
        assert!(
            m[field].is_string(),
            "trigger metadata.{field} is required and must be a string"
        );
    }
    assert!(s(&m["serverAddress"]).starts_with("http"));
    let threshold: f64 = s(&m["threshold"]).parse()?;
    assert!(threshold > 0.0);
    if !m["activationThreshold"].is_null() {
        s(&m["activationThreshold"]).parse::<f64>()?;
    }
    let query = s(&m["query"]);
    assert!(
        query.contains("kafka_infer_consumer_lag_seconds{"),
        "{query}"
    );
    let topic = s(&kind(&by_count, "ScaledObject")["spec"]["triggers"][0]["metadata"]["topic"]);
    assert!(
        query.contains(&format!("topic=\"{topic}\"")),
        "the input topic: {query}"
    );
    // The gauge is one kafka-infer exports.
    let src = std::fs::read_to_string(repo_root().join("crates/runner/src/metrics.rs"))?;
    assert!(src.contains("\"kafka_infer_consumer_lag_seconds\""));
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

/// The final stage's `USER` of the Dockerfile (the image kafka-infer's container runs).
fn dockerfile_user() -> String {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    last_stage
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// kubelet's check before it starts a container (pkg/kubelet/kuberuntime, `verifyRunAsNonRoot`):
/// with runAsNonRoot (the container's, else the pod's) true, the effective runAsUser (the
/// container's, else the pod's) must not be 0; without one, the image's USER must be a numeric
/// uid other than 0 (a user by name "cannot verify user is non-root"; no USER is root).
fn kubelet_verify_run_as_non_root(
    pod_sc: &Value,
    c_sc: &Value,
    image_user: &str,
) -> Result<(), String> {
    let pick = |k: &str| {
        if c_sc[k].is_null() {
            pod_sc[k].clone()
        } else {
            c_sc[k].clone()
        }
    };
    if pick("runAsNonRoot").as_bool() != Some(true) {
        return Ok(());
    }
    if let Some(uid) = pick("runAsUser").as_i64() {
        return if uid == 0 {
            Err("container's runAsUser breaks non-root policy".into())
        } else {
            Ok(())
        };
    }
    let user = image_user.split(':').next().unwrap_or("");
    match user.parse::<u64>() {
        Ok(0) => Err("container has runAsNonRoot and image will run as root".into()),
        Ok(_) => Ok(()),
        Err(_) if user.is_empty() || user == "root" => {
            Err("container has runAsNonRoot and image will run as root".into())
        }
        Err(_) => Err(format!(
            "container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root"
        )),
    }
}

#[test]
fn the_kubelet_rule_refuses_what_it_refuses() {
    let pod: Value = serde_norway::from_str("{runAsNonRoot: true}").unwrap();
    let none = Value::Null;
    // The pod as it was before issue 19: distroless' USER by name, TF Serving as root.
    assert!(kubelet_verify_run_as_non_root(&pod, &none, "nonroot:nonroot").is_err());
    assert!(kubelet_verify_run_as_non_root(&pod, &none, "").is_err());
    let root: Value = serde_norway::from_str("{runAsUser: 0}").unwrap();
    assert!(kubelet_verify_run_as_non_root(&pod, &root, "65532").is_err());
    let user: Value = serde_norway::from_str("{runAsUser: 1000}").unwrap();
    assert!(kubelet_verify_run_as_non_root(&pod, &user, "").is_ok());
    assert!(kubelet_verify_run_as_non_root(&pod, &none, "65532:65532").is_ok());
}

#[test]
fn the_pod_starts_on_a_real_kubelet_with_the_least_it_needs() -> Result<()> {
    let user = dockerfile_user();
    let (uid, gid) = user.split_once(':').unwrap_or((&user, ""));
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u > 0) && gid.parse::<u32>().is_ok_and(|g| g > 0),
        "the image's USER must be numeric uid:gid, not root: {user:?}"
    );
    let app = docs("kafka-infer.yaml")?;
    let dep = kind(&app, "Deployment");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(
        pod["automountServiceAccountToken"].as_bool(),
        Some(false),
        "no service-account token in a pod that never calls the API"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let mut model_ports = Vec::new();
    let mut metrics_port = None;
    for c in pod["containers"].as_sequence().unwrap() {
        let name = s(&c["name"]);
        let sc = &c["securityContext"];
        // Images other than ours are taken to run as root (TF Serving's does).
        let image_user = if s(&c["image"]).contains("kafka-infer") {
            user.as_str()
        } else {
            ""
        };
        if let Err(e) = kubelet_verify_run_as_non_root(&pod["securityContext"], sc, image_user) {
            panic!("kubelet refuses container {name}: {e}");
        }
        for k in ["runAsUser", "runAsGroup"] {
            assert!(
                sc[k].as_u64().is_some_and(|v| v > 0),
                "{name}: securityContext.{k} numeric, not root"
            );
        }
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
        assert_eq!(
            sc["capabilities"]["drop"][0].as_str(),
            Some("ALL"),
            "{name} drops every capability"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{name}: a memory limit"
        );
        for p in c["ports"].as_sequence().into_iter().flatten() {
            let n = p["containerPort"].as_u64().unwrap();
            if name == "kafka-infer" {
                metrics_port = Some(n);
            } else {
                model_ports.push(n);
            }
        }
    }
    let metrics_port = metrics_port.expect("kafka-infer's metrics port");
    // The NetworkPolicy: selects this pod, filters ingress, and lets in the metrics port only.
    let np = kind(&app, "NetworkPolicy");
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    let sel = np["spec"]["podSelector"]["matchLabels"]
        .as_mapping()
        .unwrap();
    assert!(!sel.is_empty());
    for (k, v) in sel {
        assert_eq!(
            &labels[k.as_str().unwrap()],
            v,
            "the policy selects the pod"
        );
    }
    assert!(
        np["spec"]["policyTypes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|t| t.as_str() == Some("Ingress"))
    );
    let rules = np["spec"]["ingress"].as_sequence().unwrap();
    assert!(!rules.is_empty());
    for r in rules {
        let ports = r["ports"]
            .as_sequence()
            .expect("every ingress rule names its ports (none would allow all)");
        assert!(!ports.is_empty());
        for p in ports {
            let n = match &p["port"] {
                Value::Number(n) => n.as_u64().unwrap(),
                other => panic!("port by number: {other:?}"),
            };
            assert_eq!(n, metrics_port, "only the metrics scrape gets in");
            assert!(!model_ports.contains(&n));
        }
        assert!(
            r["from"].as_sequence().is_some_and(|f| !f.is_empty()),
            "from whom (none would be everyone)"
        );
    }
    assert!(!model_ports.is_empty(), "the model's ports are declared");
    Ok(())
}
