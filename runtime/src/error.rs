//! What can go wrong while loading or running a model.

use bitnet_frontends::chat::ChatError;
use bitnet_frontends::model::ModelError;
use bitnet_frontends::tokenizer::TokenizerError;
use bitnet_ir::interp::EvalError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// The KV budget cannot hold what a sequence needs.
    #[error(transparent)]
    KvFull(#[from] crate::kv::KvFull),
    #[error("{0}")]
    Input(String),
    /// A prompt longer than the context leaves room for.
    #[error("{0}")]
    TooLong(String),
    #[error("compiling: {0}")]
    Compile(String),
    #[error("{0}")]
    Artifact(String),
}

impl RuntimeError {
    pub(crate) fn input<T>(msg: impl Into<String>) -> Result<T, RuntimeError> {
        Err(RuntimeError::Input(msg.into()))
    }
}
