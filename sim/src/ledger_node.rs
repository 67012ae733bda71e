//! A ledger node: the simulation-only `LedgerNode.Settle` RPC over the `LedgerStore` port.
//!
//! The handler is a thin shell, as a service's is: parse the wire request into domain values, call
//! the port once with a one-request batch, map the verdict back. Retries are the caller's: the same
//! event and payment ids sent again must come back as a duplicate with the first verdict.

use std::sync::Arc;

use securepay_core::ids::{AccountId, EventId, PaymentId};
use securepay_core::ledger::{Settled, Transfer};
use securepay_core::money::{Amount, AmountPolicy, Currency};
use securepay_core::payment::{FailureReason, Outcome};
use securepay_ports::{Clock, LedgerStore, PortError, SettlementRequest};
use tonic::{Request, Response, Status};

use crate::wire;
pub use crate::wire::ledger_node_client::LedgerNodeClient;
pub use crate::wire::ledger_node_server::LedgerNodeServer;

/// The port the node serves at.
pub const LEDGER_NODE_PORT: u16 = 50_051;

/// The wire code of a verdict: `completed` or the failure reason's stable code.
pub fn outcome_code(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Completed => "completed",
        Outcome::Failed(reason) => reason.code(),
    }
}

/// The verdict a wire code names, if any.
pub fn parse_outcome(code: &str) -> Option<Outcome> {
    match code {
        "completed" => Some(Outcome::Completed),
        _ => FailureReason::parse(code).map(Outcome::Failed),
    }
}

/// The settlement service of a ledger node.
pub struct LedgerNode {
    store: Arc<dyn LedgerStore>,
    clock: Arc<dyn Clock>,
}

impl LedgerNode {
    pub fn new(store: Arc<dyn LedgerStore>, clock: Arc<dyn Clock>) -> LedgerNode {
        LedgerNode { store, clock }
    }
}

#[tonic::async_trait]
impl wire::ledger_node_server::LedgerNode for LedgerNode {
    async fn settle(&self, request: Request<wire::SettleRequest>) -> Result<Response<wire::SettleReply>, Status> {
        let request = parse_request(request.get_ref())?;
        let results = self.store.settle(std::slice::from_ref(&request), self.clock.now()).await.map_err(status)?;
        let [result] = results.as_slice() else {
            return Err(Status::internal("the store answered a one-request batch with another count"));
        };
        let (outcome, duplicate) = match result.settled {
            Settled::New(outcome) => (outcome, false),
            Settled::Duplicate(outcome) => (outcome, true),
        };
        Ok(Response::new(wire::SettleReply { outcome: outcome_code(outcome).to_owned(), duplicate }))
    }
}

fn parse_request(wire: &wire::SettleRequest) -> Result<SettlementRequest, Status> {
    let invalid = |what: &str| Status::invalid_argument(format!("invalid {what}"));
    let currency = Currency::from_code(&wire.currency).map_err(|_| invalid("currency"))?;
    Ok(SettlementRequest {
        event_id: EventId::parse(&wire.event_id).map_err(|_| invalid("event_id"))?,
        transfer: Transfer {
            payment_id: PaymentId::parse(&wire.payment_id).map_err(|_| invalid("payment_id"))?,
            from: AccountId::parse(&wire.from_account).map_err(|_| invalid("from_account"))?,
            to: AccountId::parse(&wire.to_account).map_err(|_| invalid("to_account"))?,
            amount: Amount::parse(&wire.amount, currency, AmountPolicy::default()).map_err(|_| invalid("amount"))?,
        },
        outcome_event_id: EventId::parse(&wire.outcome_event_id).map_err(|_| invalid("outcome_event_id"))?,
        // This node's tests settle without trace context.
        outcome_headers: Vec::new(),
    })
}

/// The one mapping of port errors to gRPC status for this node.
fn status(e: PortError) -> Status {
    match e {
        PortError::Unavailable { component } => Status::unavailable(format!("{component} is unavailable")),
        PortError::Refused { rule } => Status::failed_precondition(rule),
        PortError::Corrupt { .. } => Status::internal("corrupt record"),
    }
}

/// The wire form of a settlement request (what a client sends, and re-sends on retry).
pub fn to_wire(request: &SettlementRequest) -> wire::SettleRequest {
    let transfer = request.transfer;
    wire::SettleRequest {
        event_id: request.event_id.to_string(),
        payment_id: transfer.payment_id.to_string(),
        from_account: transfer.from.to_string(),
        to_account: transfer.to.to_string(),
        amount: transfer.amount.to_string(),
        currency: transfer.amount.currency().code().to_owned(),
        outcome_event_id: request.outcome_event_id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_code_reads_back() {
        for outcome in [Outcome::Completed].into_iter().chain(FailureReason::ALL.map(Outcome::Failed)) {
            assert_eq!(parse_outcome(outcome_code(outcome)), Some(outcome));
        }
        assert_eq!(parse_outcome("COMPLETED"), None);
    }

    #[test]
    fn a_settlement_request_reads_back_from_its_wire_form() {
        let id = |n| uuid::Uuid::from_u128(n);
        let currency = Currency::from_code("KWD").unwrap();
        let request = SettlementRequest {
            event_id: EventId::from_uuid(id(1)),
            transfer: Transfer {
                payment_id: PaymentId::from_uuid(id(2)),
                from: AccountId::from_uuid(id(3)),
                to: AccountId::from_uuid(id(4)),
                amount: Amount::parse("1.234", currency, AmountPolicy::default()).unwrap(),
            },
            outcome_event_id: EventId::from_uuid(id(5)),
            outcome_headers: Vec::new(),
        };
        assert_eq!(parse_request(&to_wire(&request)).unwrap(), request);
        let bad = wire::SettleRequest { amount: "1.2345".into(), ..to_wire(&request) };
        assert_eq!(parse_request(&bad).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
