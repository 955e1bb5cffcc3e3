//! The node's Vault-compatible API, transport-free: an [`ApiRequest`] (already bounded and
//! read) goes in, an [`ApiResponse`] comes out. The HTTP layer above does the HTTP around it.
//!
//! Routing: the `sys/` endpoints that work while sealed (init, unseal, seal-status, health,
//! leader) are matched first; everything else needs an unsealed barrier.

pub mod auth_token;
pub mod ctx;
pub mod logical;
pub mod sys;
pub mod sys_audit;
pub mod sys_ha;
pub mod sys_mounts;
pub mod sys_policy;

use crate::error::ApiError;
use crate::ha::state::Role;
use crate::node::Node;
use crate::request::{ApiRequest, ApiResponse, Origin};

/// Handles one API request: local `sys/` endpoints in any state; the loop guard for
/// forwarded requests; a standby's fallback (307 / 503); HA endpoints; then routing.
pub async fn handle(node: &Node, req: ApiRequest) -> ApiResponse {
    let start = std::time::Instant::now();
    // The term this request was admitted in (its fencing token), if any.
    let mut admitted_in = None;
    let res = async {
        if let Some(resp) = sys::handle_local(node, &req).await? {
            return Ok(resp);
        }
        let role = node.ha().role();
        // The same for a request from this node's own proxy that still thought it active
        // (it decides again on this answer).
        let stale_local = req.origin == Origin::LocalProxy && role == Role::Standby;
        if (req.origin == Origin::Cluster && role != Role::Active) || stale_local {
            // Loop guard: a forwarded request is never forwarded or redirected again.
            return Ok(not_active_refusal());
        }
        if role == Role::Standby {
            return Ok(sys_ha::standby_fallback(node, &req));
        }
        if let Some(resp) = sys_ha::handle(node, &req).await? {
            return Ok(resp);
        }
        // Admitted and counted so a step-down lets it finish with the term's fence (not
        // sys/step-down itself, above, which waits for the term to end). Refused, with
        // nothing run, once the term is ending (or on an HA node that is not active).
        let Some(_running) = node.in_flight().enter() else {
            if node.barrier().is_sealed() {
                return Err(ApiError::Sealed);
            }
            return Ok(not_active_refusal());
        };
        admitted_in = node.ha().fence().map(|f| f.token);
        route(node, &req).await
    }
    .await;
    node.metrics().handle_request.observe(start.elapsed().as_secs_f64());
    match res {
        Ok(resp) => resp,
        Err(e) => {
            if matches!(e, ApiError::Fenced) {
                node.metrics().fencing_rejections.inc();
                // Only a rejection of the current term's token ends the current term (a
                // request of an earlier term that outlived its drain must not).
                if admitted_in.is_some() && node.ha().fence().map(|f| f.token) == admitted_in {
                    node.ha().fenced();
                }
            }
            ApiResponse::error(&e)
        }
    }
}

/// The loop guard's 503 "node not active", marked as refused before anything ran, so the
/// forwarding proxy may send the request to the next active.
pub(crate) fn not_active_refusal() -> ApiResponse {
    let mut resp = ApiResponse::error(&ApiError::NotActive);
    resp.headers
        .insert(vha_core::NOT_ACTIVE_HEADER, http::HeaderValue::from_static("1"));
    resp
}

/// Everything but the local `sys/` endpoints (answered by path before, in [`handle`]).
async fn route(node: &Node, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    if node.barrier().is_sealed() {
        return Err(ApiError::Sealed);
    }
    // Token, ACL, audit, then sys/policy, sys/mounts, sys/audit, auth/token and mounts.
    logical::serve(node, req).await
}
