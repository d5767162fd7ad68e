//! The request body, as it streams: counted against the route's limit in every phase, and fed to
//! a pending request signature, which must verify before the request goes on.

use crate::auth::{AuthError, PendingSignature};
use crate::checks::{BodyCounter, CheckError};
use crate::host::StreamHost;
use crate::problem::Denial;
use crate::replay;
use crate::{Phase, Step, Stream};

/// Where the body stands, in Envoy's terms: while the filter holds the request, Envoy buffers the
/// body and each callback reports the whole buffered size; once the request has gone on, each
/// callback reports only the new chunk.
#[derive(Debug)]
pub(crate) struct Body {
    counter: BodyCounter,
    /// Bytes Envoy holds for this filter since the request last went on.
    held: usize,
    /// Of those, how many the pending signature has read.
    fed: usize,
    complete: bool,
}

impl Default for Body {
    fn default() -> Self {
        Body { counter: BodyCounter::new(u64::MAX), held: 0, fed: 0, complete: false }
    }
}

impl Body {
    /// The request headers arrived; `end_of_stream` when there is no body at all.
    pub(crate) fn start(&mut self, end_of_stream: bool) {
        *self = Body { complete: end_of_stream, ..Body::default() };
    }

    /// The route's limit, once the route is known: counts what already arrived against it.
    pub(crate) fn limit(&mut self, counter: BodyCounter) -> Result<(), CheckError> {
        self.counter = counter;
        self.counter.add(self.held)
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.complete
    }

    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Gives the signature every held byte it has not read yet.
    pub(crate) fn feed(&mut self, host: &dyn StreamHost, signature: &mut PendingSignature) -> Result<(), Denial> {
        if self.held > self.fed {
            signature.update(&host.request_body(self.fed, self.held - self.fed).map_err(Denial::Host)?);
            self.fed = self.held;
        }
        Ok(())
    }

    /// The request went on: Envoy passed what it held to the upstream.
    pub(crate) fn went_on(&mut self) {
        self.held = 0;
        self.fed = 0;
    }
}

/// A body callback (or the trailers, which end the body) reported `size` bytes.
pub(crate) fn arrived(stream: &mut Stream, host: &mut dyn StreamHost, size: usize, end: bool) -> Result<Step, Denial> {
    if matches!(stream.phase, Phase::Answered | Phase::Start) {
        return Ok(Step::Wait(std::mem::replace(&mut stream.phase, Phase::Start)));
    }
    let body = &mut stream.body;
    body.counter.add(size.saturating_sub(body.held))?;
    body.held = size;
    body.complete |= end;
    if let Some(signature) = &mut stream.signature {
        body.feed(host, signature)?;
    }
    match stream.phase {
        // Every check passed already; `advance` lets the chunk on.
        Phase::Forwarded => Ok(Step::Admitted),
        Phase::VerifyBody if body.complete => Ok(Step::Admitted),
        _ => Ok(Step::Wait(std::mem::replace(&mut stream.phase, Phase::Start))),
    }
}

/// The whole body has been fed: the signature must match, and be new to every worker.
pub(crate) fn finish_signature(stream: &mut Stream, host: &mut dyn StreamHost) -> Result<(), Denial> {
    let Some(pending) = stream.signature.take() else { return Ok(()) };
    let now = host.now();
    let accepted = {
        let mut replays = stream.worker.replays.try_borrow_mut().map_err(|_| AuthError::ReplayCacheFull)?;
        pending.finish(&mut replays, now)?
    };
    replay::record(host, &accepted, now)?;
    Ok(())
}
