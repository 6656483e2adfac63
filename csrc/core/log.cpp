#include "mooncake_vllm/log.h"

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>

namespace mooncake_vllm {

namespace {
LogLevel configured_level() {
  const char* env = std::getenv("MOONCAKE_VLLM_LOG");
  if (!env) return LogLevel::kInfo;
  if (!std::strcmp(env, "debug")) return LogLevel::kDebug;
  if (!std::strcmp(env, "warn")) return LogLevel::kWarn;
  if (!std::strcmp(env, "error")) return LogLevel::kError;
  return LogLevel::kInfo;
}
const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "DEBUG";
    case LogLevel::kInfo: return "INFO";
    case LogLevel::kWarn: return "WARNING";
    default: return "ERROR";
  }
}
}  // namespace

bool log_enabled(LogLevel level) {
  static const LogLevel threshold = configured_level();
  return static_cast<int>(level) >= static_cast<int>(threshold);
}

void log_line(LogLevel level, const std::string& text) {
  static std::mutex mu;
  std::lock_guard lock(mu);
  std::cerr << "[mooncake_vllm.engine " << level_name(level) << "] " << text << std::endl;
}

}  // namespace mooncake_vllm
