// Minimal leveled logging to stderr; MOONCAKE_VLLM_LOG=debug|info|warn|error (default info).
#pragma once

#include <sstream>
#include <string>

namespace mooncake_vllm {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

bool log_enabled(LogLevel level);
void log_line(LogLevel level, const std::string& text);

}  // namespace mooncake_vllm

#define MV_LOG(level, expr)                                                   \
  do {                                                                        \
    if (::mooncake_vllm::log_enabled(::mooncake_vllm::LogLevel::level)) {     \
      std::ostringstream mv_log_stream_;                                      \
      mv_log_stream_ << expr;                                                 \
      ::mooncake_vllm::log_line(::mooncake_vllm::LogLevel::level, mv_log_stream_.str()); \
    }                                                                         \
  } while (0)
