//! The worker-client actor: the actix face of [`kvcoord_client::Client`]
//! for hosts that are actor systems. It ties the client's life to the
//! actor's (the connection closes when the actor stops) and accepts requests
//! as messages. It adds no behaviour: reconnect, epoch and re-registration
//! are the client core's, and must stay there.

use std::ops::Deref;
use std::time::Duration;

use actix::prelude::*;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_transport::{ReplyBody, RequestBody, RequestError};

/// The worker-client actor.
pub struct WorkerClient {
    client: Client,
}

impl WorkerClient {
    /// Starts a worker client (inside an actix `System`) and returns its API.
    pub fn start(cfg: ClientConfig) -> WorkerHandle {
        let client = Client::start(cfg);
        let addr = WorkerClient { client: client.clone() }.start();
        WorkerHandle { addr, client }
    }
}

impl Actor for WorkerClient {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.client.close();
    }
}

/// One request, as a message to the actor.
#[derive(Message)]
#[rtype(result = "Result<ReplyBody, RequestError>")]
pub struct Call {
    pub body: RequestBody,
    pub timeout: Duration,
}

impl Handler<Call> for WorkerClient {
    type Result = ResponseFuture<Result<ReplyBody, RequestError>>;
    fn handle(&mut self, msg: Call, _: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        Box::pin(async move { client.call(msg.body, msg.timeout).await })
    }
}

/// The actor's address with the client's typed API (through `Deref`). The
/// client closes when the actor stops, which happens when the last handle
/// (address) is dropped: keep a handle for as long as the client is used.
#[derive(Clone)]
pub struct WorkerHandle {
    addr: Addr<WorkerClient>,
    client: Client,
}

impl WorkerHandle {
    pub fn addr(&self) -> &Addr<WorkerClient> {
        &self.addr
    }
}

impl Deref for WorkerHandle {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}
