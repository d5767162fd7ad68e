//! The request body, as it streams: counted against the route's limit in every phase, and fed to
//! a signed request's body check, which must pass before the body's end goes on.

use crate::auth::{Accepted, AuthError, BodyCheck};
use crate::checks::{BodyCounter, CheckError};
use crate::host::StreamHost;
use crate::problem::Denial;
use crate::{Phase, Step, Stream};

/// Where the body stands, in Envoy's terms: while the filter holds the request, Envoy buffers the
/// body and each callback reports the whole buffered size; once the request has gone on, each
/// callback reports only the new chunk.
#[derive(Debug)]
pub(crate) struct Body {
    counter: BodyCounter,
    /// Bytes Envoy holds for this filter since the request last went on.
    held: usize,
    /// Of those, how many the body check has read.
    fed: usize,
    complete: bool,
    /// The length `Content-Length` declared, if any.
    length: Option<u64>,
}

impl Default for Body {
    fn default() -> Self {
        Body { counter: BodyCounter::new(u64::MAX), held: 0, fed: 0, complete: false, length: None }
    }
}

impl Body {
    /// The request headers arrived; `end_of_stream` when there is no body at all.
    pub(crate) fn start(&mut self, end_of_stream: bool) {
        *self = Body { complete: end_of_stream, ..Body::default() };
    }

    /// The route's limit and the declared length, once known: counts what already arrived.
    pub(crate) fn limit(&mut self, counter: BodyCounter, length: Option<u64>) -> Result<(), CheckError> {
        self.counter = counter;
        self.length = length;
        self.counter.add(self.held)
    }

    /// Whether what Envoy holds may go on before the body's check is done: not the bytes that
    /// complete a declared length, which the upstream would take as the whole body whether or not
    /// the end of the stream follows (Envoy may report the end in a callback of its own).
    fn may_stream(&self) -> bool {
        !self.complete && self.length.is_none_or(|length| self.counter.seen() < length)
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.complete
    }

    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Gives the check every held byte it has not read yet.
    pub(crate) fn feed(&mut self, host: &dyn StreamHost, check: &mut BodyCheck) -> Result<(), Denial> {
        if self.held > self.fed {
            check.update(&host.request_body(self.fed, self.held - self.fed).map_err(Denial::Host)?);
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
    if let Some(check) = &mut stream.body_check {
        body.feed(host, check)?;
    }
    match stream.phase {
        // Every check passed already; `advance` lets the chunk on.
        Phase::Forwarded => Ok(Step::Admitted),
        Phase::VerifyBody if body.complete => Ok(Step::Admitted),
        Phase::VerifyBody if body.may_stream() && stream.body_check.as_ref().is_some_and(|c| c.streams()) => {
            Ok(Step::Stream(Phase::VerifyBody))
        }
        _ => Ok(Step::Wait(std::mem::replace(&mut stream.phase, Phase::Start))),
    }
}

/// The whole body has been fed: it must pass its check, and a signature over it be new to every
/// worker.
pub(crate) fn finish_check(stream: &mut Stream, host: &mut dyn StreamHost) -> Result<(), Denial> {
    let Some(check) = stream.body_check.take() else { return Ok(()) };
    let now = host.now();
    let accepted = {
        let mut replays = stream.worker.replays.try_borrow_mut().map_err(|_| AuthError::ReplayCacheFull)?;
        check.finish(&mut replays, now)?
    };
    if let Some(accepted) = accepted {
        stream.worker.seen_signatures.record(host, &accepted, now)?;
    }
    Ok(())
}

/// A signature checked at request headers: accepted once, on this worker and across all of them.
pub(crate) fn accept(stream: &Stream, host: &mut dyn StreamHost, accepted: &Accepted, now: u64) -> Result<(), Denial> {
    let mut replays = stream.worker.replays.try_borrow_mut().map_err(|_| AuthError::ReplayCacheFull)?;
    replays.insert(accepted.signature, accepted.expires_at, now)?;
    drop(replays);
    stream.worker.seen_signatures.record(host, accepted, now)?;
    Ok(())
}
