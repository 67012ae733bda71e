//! The one error type of the ports. Adapters map their driver errors into it once; services decide
//! on retry vs. refuse from the variant, never from driver text (which must not reach clients).

/// Why a port call did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The backing component is down or timed out. Nothing is known to have been written; the
    /// caller may retry (idempotently) or fail the request with a 503-class error.
    #[error("{component} is unavailable")]
    Unavailable { component: &'static str },
    /// A uniqueness or state rule of the store refused the write (a duplicate, an illegal
    /// transition). Nothing was written.
    #[error("refused by the store: {rule}")]
    Refused { rule: &'static str },
    /// Stored data could not be read back as a domain value: a bug or corruption, never retried.
    #[error("corrupt record: {what}")]
    Corrupt { what: String },
}

pub type PortResult<T> = Result<T, PortError>;
