"""The daemon's web page in a real browser: headless Chromium, driven by Selenium.

Usage: page.py BASE_URL ADMIN_KEY IMAGE   (run by tests/e2e/page.rs; needs `apt install chromium
chromium-driver` and `pip install -r tests/browser/requirements.txt`)
The daemon serves `echo` (which streams back every message's content, joined by newlines)
behind keys.
"""

import re
import sys

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

base, key, image = sys.argv[1], sys.argv[2], sys.argv[3]
options = webdriver.ChromeOptions()
for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
    options.add_argument(flag)
service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
driver = webdriver.Chrome(options=options, service=service)
wait = WebDriverWait(driver, 30)
try:
    driver.get(base + "/")
    # Keys are set: the page says so until one is given.
    notice = wait.until(ec.visibility_of_element_located((By.ID, "notice")))
    assert "key" in notice.text, notice.text
    field = driver.find_element(By.ID, "key")
    # A wrong key: the page says it is not valid (the warning was cleared at once before).
    field.send_keys("wrong")
    field.send_keys("\t")
    wait.until(lambda d: "not valid" in d.find_element(By.ID, "notice").text)
    assert driver.find_element(By.ID, "notice").is_displayed()
    field.clear()
    field.send_keys(key)
    field.send_keys("\t")  # change event
    wait.until(lambda d: "echo" in [o.text for o in Select(d.find_element(By.ID, "model")).options])
    Select(driver.find_element(By.ID, "model")).select_by_visible_text("echo")

    # A chat: the answer streams into an assistant bubble, with its finish reason; the system
    # prompt went with it.
    driver.find_element(By.ID, "system").send_keys("Be brief.")
    driver.find_element(By.ID, "input").send_keys("hello browser")
    driver.find_element(By.ID, "send").click()
    answer = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#messages li.assistant .meta")))
    text = driver.find_element(By.CSS_SELECTOR, "#messages li.assistant .content").text
    assert text == "Be brief.\nhello browser", text
    assert "finish: stop" in answer.text, answer.text
    users = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#messages li.user")]
    assert users == ["hello browser"], users

    # A second turn sends the whole conversation.
    driver.find_element(By.ID, "input").send_keys("again\n")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages li.assistant .meta")) == 2)
    texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages li.assistant .content")]
    assert texts[1] == "Be brief.\nhello browser\nBe brief.\nhello browser\nagain", texts

    # Tool calls come back as calls, not text.
    tools = '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]'
    driver.find_element(By.ID, "tools").send_keys(tools)
    system = driver.find_element(By.ID, "system")
    system.clear()
    driver.find_element(By.ID, "clear").click()
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    box = driver.find_element(By.ID, "input")
    box.send_keys(call)
    driver.find_element(By.ID, "send").click()
    shown = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#messages li.assistant .tool-call")))
    assert shown.text == '→ get_weather({"city":"Paris"})', shown.text
    meta = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#messages li.assistant .meta")))
    assert "finish: tool_calls" in meta.text, meta.text
    driver.find_element(By.ID, "tools").clear()

    # Reasoning is folded above the answer (`thinker` marks it as GLM does; thinking is on).
    Select(driver.find_element(By.ID, "model")).select_by_visible_text("thinker")
    driver.find_element(By.ID, "clear").click()
    driver.find_element(By.ID, "input").send_keys("ponder</think>answer\n")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#messages li.assistant .meta")))
    details = driver.find_element(By.CSS_SELECTOR, "#messages li.assistant details")
    assert details.get_attribute("open") is None, "folded"
    assert driver.find_element(By.CSS_SELECTOR, "#messages li.assistant .reasoning").get_attribute("textContent") == "ponder"
    assert driver.find_element(By.CSS_SELECTOR, "#messages li.assistant .content").text == "answer"

    # Stop ends a stream at once (40 ms a character: this one would take 8 s).
    driver.find_element(By.ID, "clear").click()
    driver.find_element(By.ID, "input").send_keys("</think>" + "z" * 200 + "\n")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#messages li.assistant .content").text.startswith("zz"))
    driver.find_element(By.ID, "stop").click()
    meta = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#messages li.assistant .meta")))
    assert "stopped" in meta.text, meta.text
    partial = driver.find_element(By.CSS_SELECTOR, "#messages li.assistant .content").text
    assert 2 <= len(partial) < 200, len(partial)
    assert driver.find_element(By.ID, "send").is_enabled()
    Select(driver.find_element(By.ID, "model")).select_by_visible_text("echo")

    # A vision model offers an image field; the picture goes with the message (random weights:
    # any answer, but an answer, not an error).
    assert not driver.find_element(By.ID, "image-field").is_displayed()
    Select(driver.find_element(By.ID, "model")).select_by_visible_text("qwen3-vl-2b")
    assert driver.find_element(By.ID, "image-field").is_displayed()
    driver.find_element(By.ID, "clear").click()
    driver.find_element(By.ID, "image").send_keys(image)
    max_tokens = driver.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("4")
    driver.find_element(By.ID, "input").send_keys("What is in the picture?\n")
    meta = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#messages li.assistant .meta")))
    # Random weights sample the end token now and then: "stop" within the limit is an answer too.
    finished = re.search(r"finish: (length|stop) · (\d+) tokens", meta.text)
    assert finished, meta.text
    assert 1 <= int(finished.group(2)) <= 4, meta.text
    assert finished.group(1) == "stop" or finished.group(2) == "4", meta.text
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages li.error")
    assert driver.find_element(By.CSS_SELECTOR, "#messages li.user img").get_attribute("src").startswith("data:image/jpeg;base64,")
    Select(driver.find_element(By.ID, "model")).select_by_visible_text("echo")

    # An error from the API is shown, not swallowed.
    temperature = driver.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("9")
    driver.find_element(By.ID, "input").send_keys("hot\n")
    error = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#messages li.error")))
    assert "temperature" in error.text, error.text

    # Status: the echo plugin, ready, at its tier, with the tokens it generated counted.
    driver.find_element(By.ID, "tab-status").click()
    # The table is rebuilt every 2 s: its cells are read in one go, in the page.
    read_row = """const row = document.querySelector('#plugins tr[data-plugin=echo]');
                  return row && [...row.cells].map((c) => c.textContent);"""
    cells = wait.until(lambda d: d.execute_script(read_row))
    assert cells[0].startswith("echo") and cells[1] == "ready", cells
    assert cells[2].startswith("low →"), cells
    assert driver.find_element(By.ID, "chat").is_displayed() is False
    print("web page: all checks passed")
finally:
    driver.quit()
