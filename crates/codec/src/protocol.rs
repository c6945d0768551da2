//! The three protocols, the graph node kinds, and where a request goes: REST paths and gRPC
//! methods. Pure functions of names; no I/O.

use std::{fmt, str::FromStr};

use crate::error::CodecError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Seldon,
    Tensorflow,
    /// Open Inference Protocol ("kfserving", "v2").
    V2,
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "seldon" => Ok(Self::Seldon),
            "tensorflow" | "tfserving" => Ok(Self::Tensorflow),
            "kfserving" | "v2" | "kserve" | "oip" | "open-inference" => Ok(Self::V2),
            o => Err(format!(
                "unknown protocol `{o}` (seldon, tensorflow, kfserving or v2)"
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Seldon => "seldon",
            Self::Tensorflow => "tensorflow",
            Self::V2 => "v2",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Rest,
    Grpc,
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rest" | "http" => Ok(Self::Rest),
            "grpc" => Ok(Self::Grpc),
            o => Err(format!("unknown transport `{o}` (rest or grpc)")),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rest => "rest",
            Self::Grpc => "grpc",
        })
    }
}

/// A SeldonDeployment graph node's `type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NodeType {
    #[default]
    Model,
    Transformer,
    OutputTransformer,
    Router,
    Combiner,
}

impl FromStr for NodeType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().replace('-', "_").as_str() {
            "MODEL" | "" => Ok(Self::Model),
            "TRANSFORMER" => Ok(Self::Transformer),
            "OUTPUT_TRANSFORMER" => Ok(Self::OutputTransformer),
            "ROUTER" => Ok(Self::Router),
            "COMBINER" => Ok(Self::Combiner),
            o => Err(format!(
                "unknown graph node type `{o}` (MODEL, TRANSFORMER, OUTPUT_TRANSFORMER, ROUTER, COMBINER)"
            )),
        }
    }
}

/// A gRPC method: its path and the messages it takes and returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcMethod {
    pub path: &'static str,
    pub request: &'static str,
    pub response: &'static str,
}

const fn m(path: &'static str, request: &'static str, response: &'static str) -> GrpcMethod {
    GrpcMethod {
        path,
        request,
        response,
    }
}

pub const SELDON_MESSAGE: &str = "seldon.protos.SeldonMessage";
pub const TF_PREDICT_REQUEST: &str = "tensorflow.serving.PredictRequest";
pub const TF_PREDICT_RESPONSE: &str = "tensorflow.serving.PredictResponse";
pub const V2_INFER_REQUEST: &str = "inference.ModelInferRequest";
pub const V2_INFER_RESPONSE: &str = "inference.ModelInferResponse";

/// The message a protocol's main call takes, for JSON records sent over gRPC.
pub fn default_request(protocol: Protocol, node: NodeType) -> &'static str {
    match (protocol, node) {
        (Protocol::Seldon, NodeType::Combiner) => "seldon.protos.SeldonMessageList",
        (Protocol::Seldon, _) => SELDON_MESSAGE,
        (Protocol::Tensorflow, _) => TF_PREDICT_REQUEST,
        (Protocol::V2, _) => V2_INFER_REQUEST,
    }
}

/// The gRPC method for a request message (from `proto-name`, or the protocol's default).
pub fn grpc_method(
    protocol: Protocol,
    node: NodeType,
    request: &str,
) -> Result<GrpcMethod, CodecError> {
    const SM: &str = SELDON_MESSAGE;
    let found = match (protocol, request) {
        (Protocol::Seldon, "seldon.protos.Feedback") => Some(match node {
            NodeType::Router => m(
                "/seldon.protos.Router/SendFeedback",
                request_static(request),
                SM,
            ),
            _ => m(
                "/seldon.protos.Model/SendFeedback",
                request_static(request),
                SM,
            ),
        }),
        (Protocol::Seldon, "seldon.protos.SeldonMessageList") => Some(m(
            "/seldon.protos.Combiner/Aggregate",
            "seldon.protos.SeldonMessageList",
            SM,
        )),
        (Protocol::Seldon, SELDON_MESSAGE) => Some(match node {
            NodeType::Model => m("/seldon.protos.Model/Predict", SM, SM),
            NodeType::Transformer => m("/seldon.protos.Transformer/TransformInput", SM, SM),
            NodeType::OutputTransformer => {
                m("/seldon.protos.OutputTransformer/TransformOutput", SM, SM)
            }
            NodeType::Router => m("/seldon.protos.Router/Route", SM, SM),
            NodeType::Combiner => m("/seldon.protos.Generic/Aggregate", SM, SM),
        }),
        (Protocol::Tensorflow, TF_PREDICT_REQUEST) => Some(m(
            "/tensorflow.serving.PredictionService/Predict",
            TF_PREDICT_REQUEST,
            TF_PREDICT_RESPONSE,
        )),
        (Protocol::Tensorflow, "tensorflow.serving.ClassificationRequest") => Some(m(
            "/tensorflow.serving.PredictionService/Classify",
            "tensorflow.serving.ClassificationRequest",
            "tensorflow.serving.ClassificationResponse",
        )),
        (Protocol::Tensorflow, "tensorflow.serving.RegressionRequest") => Some(m(
            "/tensorflow.serving.PredictionService/Regress",
            "tensorflow.serving.RegressionRequest",
            "tensorflow.serving.RegressionResponse",
        )),
        (Protocol::Tensorflow, "tensorflow.serving.MultiInferenceRequest") => Some(m(
            "/tensorflow.serving.PredictionService/MultiInference",
            "tensorflow.serving.MultiInferenceRequest",
            "tensorflow.serving.MultiInferenceResponse",
        )),
        (Protocol::Tensorflow, "tensorflow.serving.GetModelMetadataRequest") => Some(m(
            "/tensorflow.serving.PredictionService/GetModelMetadata",
            "tensorflow.serving.GetModelMetadataRequest",
            "tensorflow.serving.GetModelMetadataResponse",
        )),
        (Protocol::V2, V2_INFER_REQUEST) => Some(m(
            "/inference.GRPCInferenceService/ModelInfer",
            V2_INFER_REQUEST,
            V2_INFER_RESPONSE,
        )),
        _ => None,
    };
    found.ok_or_else(|| CodecError::WrongProtocol {
        protocol,
        why: format!("a `{request}` is not a request of the {protocol} protocol"),
    })
}

fn request_static(name: &str) -> &'static str {
    match name {
        "seldon.protos.Feedback" => "seldon.protos.Feedback",
        _ => SELDON_MESSAGE,
    }
}

/// The REST path of a node. `model`: the graph node's name; `version` optional.
pub fn rest_path(
    protocol: Protocol,
    node: NodeType,
    model: &str,
    version: Option<&str>,
    request: &str,
) -> String {
    match protocol {
        Protocol::Seldon => match (node, request) {
            (_, "seldon.protos.Feedback") => "/send-feedback".into(),
            (NodeType::Model, _) => "/predict".into(),
            (NodeType::Transformer, _) => "/transform-input".into(),
            (NodeType::OutputTransformer, _) => "/transform-output".into(),
            (NodeType::Router, _) => "/route".into(),
            (NodeType::Combiner, _) => "/aggregate".into(),
        },
        Protocol::Tensorflow => {
            let verb = match request {
                "tensorflow.serving.ClassificationRequest" => "classify",
                "tensorflow.serving.RegressionRequest" => "regress",
                _ => "predict",
            };
            match version {
                Some(v) => format!("/v1/models/{model}/versions/{v}:{verb}"),
                None => format!("/v1/models/{model}:{verb}"),
            }
        }
        Protocol::V2 => match version {
            Some(v) => format!("/v2/models/{model}/versions/{v}/infer"),
            None => format!("/v2/models/{model}/infer"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_like_seldon() {
        assert_eq!("kfserving".parse::<Protocol>().unwrap(), Protocol::V2);
        assert_eq!(
            "Tensorflow".parse::<Protocol>().unwrap(),
            Protocol::Tensorflow
        );
        assert!("soap".parse::<Protocol>().is_err());
        assert_eq!("GRPC".parse::<Transport>().unwrap(), Transport::Grpc);
        assert_eq!(
            "OUTPUT_TRANSFORMER".parse::<NodeType>().unwrap(),
            NodeType::OutputTransformer
        );
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            rest_path(
                Protocol::Tensorflow,
                NodeType::Model,
                "resnet32",
                None,
                TF_PREDICT_REQUEST
            ),
            "/v1/models/resnet32:predict"
        );
        assert_eq!(
            rest_path(
                Protocol::V2,
                NodeType::Model,
                "m",
                Some("2"),
                V2_INFER_REQUEST
            ),
            "/v2/models/m/versions/2/infer"
        );
        assert_eq!(
            rest_path(
                Protocol::Seldon,
                NodeType::Transformer,
                "t",
                None,
                SELDON_MESSAGE
            ),
            "/transform-input"
        );
        let g = grpc_method(
            Protocol::Tensorflow,
            NodeType::Model,
            "tensorflow.serving.ClassificationRequest",
        )
        .unwrap();
        assert_eq!(g.path, "/tensorflow.serving.PredictionService/Classify");
        assert!(grpc_method(Protocol::V2, NodeType::Model, TF_PREDICT_REQUEST).is_err());
    }
}
