// The TCP transport's wire format. Both ends are this engine on the same architecture family
// (little-endian x86-64 / aarch64), so structs go on the wire as they are in memory.
#pragma once

#include <cstdint>

namespace mooncake_vllm::tcp {

constexpr uint32_t kMagic = 0x4C56434D;  // "MCVL"
constexpr uint16_t kVersion = 1;
constexpr uint32_t kMaxEntriesPerMessage = 1u << 16;
constexpr size_t kNonceBytes = 32;
constexpr size_t kMacBytes = 32;

// Server -> client, first thing on every connection.
struct Hello {
  uint32_t magic;
  uint16_t version;
  uint16_t auth_required;
  uint8_t nonce[kNonceBytes];
};

// Client -> server: HMAC-SHA256(cluster token, nonce) or zeros when the client has no token.
struct Auth {
  uint32_t magic;
  uint32_t reserved;
  uint8_t mac[kMacBytes];
};

// Server -> client: 0 accepted, otherwise refused (the server closes the connection).
struct Verdict {
  uint32_t magic;
  int32_t status;
};

enum class WireOp : uint8_t { kWrite = 1, kRead = 2, kControl = 3 };

// Client -> server. Followed by `count` Entry records, then (WRITE) the payload of every entry
// in order, or (CONTROL) `total_bytes` of opaque request.
struct RequestHeader {
  uint32_t magic;
  uint8_t op;
  uint8_t reserved[3];
  uint32_t count;
  uint32_t reserved2;
  uint64_t seq;
  uint64_t total_bytes;
};

struct Entry {
  uint64_t remote;
  uint64_t length;
};

// Server -> client, one per request, in request order. Followed by `error_len` bytes of error
// text, then `payload_bytes` (READ: the data of every entry in order; CONTROL: the reply).
struct ResponseHeader {
  uint32_t magic;
  int32_t status;  // 0 ok
  uint64_t seq;
  uint32_t error_len;
  uint32_t reserved;
  uint64_t payload_bytes;
};

static_assert(sizeof(RequestHeader) == 32, "wire layout");
static_assert(sizeof(ResponseHeader) == 32, "wire layout");
static_assert(sizeof(Entry) == 16, "wire layout");

}  // namespace mooncake_vllm::tcp
