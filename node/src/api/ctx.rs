//! What a handler of the authenticated pipeline gets: the request, the caller's token and
//! ACL, and the operation, after authentication, authorization and the audit of the request.

use crate::node::Node;
use crate::policy::{Acl, Operation};
use crate::request::ApiRequest;
use crate::token::TokenEntry;

/// Everything a handler may need about the request.
pub struct Ctx<'a> {
    pub node: &'a Node,
    pub req: &'a ApiRequest,
    pub request_id: String,
    /// The caller's token entry (after counting this use).
    pub auth: TokenEntry,
    /// The token as presented (never stored, never logged).
    pub token: String,
    pub acl: Acl,
    pub op: Operation,
}

/// Whose capabilities `sys/capabilities*` asks about.
#[derive(Clone, Copy)]
pub enum CapsKind {
    SelfToken,
    Token,
    Accessor,
}
