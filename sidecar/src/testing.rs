//! Test support for the sidecar's unit tests: migrations without a VMM.

use faultline::sidecar_api::{Policy, Role, StartMigration};
use faultline::wire::Secret;

use crate::migration::Migration;

/// A migration as `POST /v1/migrations` would start it.
pub fn migration(role: Role, policy: Policy) -> Migration {
    let secret = Secret::generate().expect("secret");
    let request = StartMigration {
        id: "ns/m/1".into(),
        role,
        peer: (role == Role::Source).then(|| "127.0.0.1:1".into()),
        secret: secret.to_base64(),
        policy,
    };
    let protection =
        crate::transport::Protection::new(request.policy.transport, role, &secret, &request.id)
            .expect("protection");
    Migration::new(request, secret, protection)
}
