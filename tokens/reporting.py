"""The refresh log in the old tool's style and with its Chinese labels.

Header, one line per token (名片, 用户, 最后使用, 结果) and a statistics block. Lines go to the
``tokens.refresh`` logger; ``--log-file`` adds a file handler to it.
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.utils import timezone

from tokens.clients import CheckOutcome

logger = logging.getLogger("tokens.refresh")
RULE = "=" * 60

OUTCOME_LABELS = {
    CheckOutcome.VALID: "有效，已刷新",
    CheckOutcome.INVALID: "无效 (invalid access_token)",
    CheckOutcome.SUSPECT: "可疑，可能已退出登录",
    CheckOutcome.RATE_LIMITED: "请求过于频繁，稍后重试",
    CheckOutcome.TRANSIENT: "失败",
}
TRIGGER_LABELS = {"beat": "定时任务", "command": "命令行", "admin": "管理后台"}


def format_time(value: datetime | None) -> str:
    if value is None:
        return "从未使用"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S")


def log_run_header(
    *,
    run_id: int,
    kind: str,
    trigger: str,
    planned: int,
    max_age_days: int | None,
    cleanup_days: int | None = None,
    dry_run: bool = False,
) -> None:
    title = "报名工具 Token 清理开始" if kind == "cleanup" else "报名工具 Token 刷新开始"
    logger.info(RULE)
    logger.info(
        "%s%s (运行 #%s, 触发: %s)",
        title,
        " [演练 dry-run]" if dry_run else "",
        run_id,
        TRIGGER_LABELS.get(trigger, trigger),
    )
    logger.info("开始时间: %s", format_time(timezone.now()))
    if kind == "cleanup":
        logger.info("清理条件: 超过 %s 天未使用的 Token", cleanup_days)
        logger.info("待清理 Token 数量: %s", planned)
    else:
        scope = f"最近 {max_age_days} 天内使用过的 Token" if max_age_days is not None else "全部 Token"
        logger.info("刷新范围: %s", scope)
        logger.info("待刷新 Token 数量: %s", planned)
    logger.info(RULE)


def log_token_line(
    *,
    index: int,
    planned: int,
    card_name: str,
    user_name: str,
    last_used: datetime | None,
    outcome: CheckOutcome,
    message: str,
) -> None:
    label = OUTCOME_LABELS[outcome]
    if outcome in (CheckOutcome.TRANSIENT, CheckOutcome.SUSPECT) or (outcome == CheckOutcome.RATE_LIMITED and message):
        label = f"{label}: {message}"
    level = logging.INFO if outcome == CheckOutcome.VALID else logging.WARNING
    logger.log(
        level,
        "[%d/%d] 名片: %s | 用户: %s | 最后使用: %s | 结果: %s",
        index,
        planned,
        card_name,
        user_name or "-",
        format_time(last_used),
        label,
    )


def log_deleted_line(*, card_name: str, user_name: str, masked: str, reason: str) -> None:
    logger.warning(
        "已删除 Token: 名片: %s | 用户: %s | Token: %s | 原因: %s", card_name, user_name or "-", masked, reason
    )


def log_run_statistics(
    *,
    kind: str,
    status_label: str,
    total: int,
    ok: int,
    failed: int,
    invalid: int,
    deleted: int,
    rate_limited: int,
    duration: float,
    breaker_tripped: bool,
    dry_run: bool,
    error: str = "",
) -> None:
    logger.info(RULE)
    logger.info("%s统计%s", "清理" if kind == "cleanup" else "刷新", " (演练 dry-run，未修改数据)" if dry_run else "")
    logger.info("状态: %s", status_label)
    logger.info("总数: %d", total)
    if kind != "cleanup":
        logger.info("成功: %d", ok)
        logger.info("失败: %d", failed)
        logger.info("无效: %d", invalid)
    logger.info("%s: %d", "将删除" if dry_run else "删除", deleted)
    if kind != "cleanup":
        logger.info("限流: %d", rate_limited)
    logger.info("耗时: %.2f 秒", duration)
    if breaker_tripped and dry_run:
        logger.warning("熔断: 无效比例过高，正式运行将不删除任何 Token (circuit breaker would trip)")
    elif breaker_tripped:
        logger.error("熔断: 无效比例过高，本次运行未删除任何 Token (circuit breaker tripped)")
    if error:
        logger.warning("原因: %s", error)
    logger.info(RULE)


def log_cleanup_skipped(*, reason: str) -> None:
    logger.warning("清理已跳过，未删除任何 Token: %s", reason)
